//! The `executor:` block: where a pipeline's instances run (locally, or as Slurm jobs) and what
//! a cluster is asked for. It may stand in a pipeline or in a `--profile` file; the profile
//! wins field by field, so one pipeline runs unchanged on a laptop and on a cluster.
//!
//! Also the two resource values that are durations and sizes (`time: 2h`, `mem: 4G`), parsed
//! here for both a stage's `resources:` and the block's `kinds:`.

use std::collections::BTreeMap;
use std::path::Path;

use serde_yaml::Value as Yaml;

use super::{Ctx, SpecError, SpecErrors, SpecResult, key_str, locate, show_yaml, type_name};
use crate::stage_kind::Catalog;

pub(crate) const EXECUTOR_KEYS: &[&str] =
    &["kind", "partition", "account", "qos", "max_jobs", "sbatch", "arrays", "on_controller", "batch", "poll", "kinds"];
pub(crate) const KIND_KEYS: &[&str] = &["time", "mem", "retries", "sbatch"];
pub(crate) const POLL_KEYS: &[&str] = &["min_s", "max_s", "give_up_s"];

/// Where instances run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExecutorKind {
    #[default]
    Local,
    Slurm,
}

impl ExecutorKind {
    pub fn parse(s: &str) -> Option<ExecutorKind> {
        match s {
            "local" => Some(ExecutorKind::Local),
            "slurm" => Some(ExecutorKind::Slurm),
            _ => None,
        }
    }
}

/// What sbatch is asked for per stage kind (or stage name): each field overrides the stage's
/// `resources` for the cluster only.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KindSettings {
    /// Seconds.
    pub time: Option<u64>,
    /// MiB.
    pub mem: Option<u64>,
    /// How many times a failed job of this kind is submitted again.
    pub retries: Option<u32>,
    pub sbatch: Option<Vec<String>>,
}

impl KindSettings {
    /// `self` over `base`, field by field: a profile's `kinds.train: {mem: 1G}` keeps the
    /// pipeline's `time` and `retries` for `train` (a lost `time` would fall back to the
    /// partition's default limit, silently).
    pub fn over(self, base: KindSettings) -> KindSettings {
        KindSettings {
            time: self.time.or(base.time),
            mem: self.mem.or(base.mem),
            retries: self.retries.or(base.retries),
            sbatch: self.sbatch.or(base.sbatch),
        }
    }
}

/// The block as written: every field optional, so that a profile overrides a pipeline's block
/// field by field ([`ExecutorSpec::over`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExecutorSpec {
    pub kind: Option<ExecutorKind>,
    pub partition: Option<String>,
    pub account: Option<String>,
    pub qos: Option<String>,
    pub max_jobs: Option<u32>,
    pub sbatch: Option<Vec<String>>,
    pub arrays: Option<bool>,
    pub on_controller: Option<Vec<String>>,
    pub batch: Option<BTreeMap<String, u32>>,
    pub poll_min_s: Option<f64>,
    pub poll_max_s: Option<f64>,
    pub poll_give_up_s: Option<f64>,
    /// By stage kind or stage name; a profile's entry for a name wins over the pipeline's
    /// field by field ([`KindSettings::over`]).
    pub kinds: BTreeMap<String, KindSettings>,
}

/// The block resolved: defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct ExecutorConfig {
    pub kind: ExecutorKind,
    pub partition: Option<String>,
    pub account: Option<String>,
    pub qos: Option<String>,
    /// Jobs in flight (an array task counts one).
    pub max_jobs: u32,
    pub sbatch: Vec<String>,
    pub arrays: bool,
    pub on_controller: Vec<String>,
    /// Instances per job, by kind; absent means 1.
    pub batch: BTreeMap<String, u32>,
    pub poll_min_s: f64,
    pub poll_max_s: f64,
    /// How long `squeue` may fail in a row before the controller gives up on its jobs.
    pub poll_give_up_s: f64,
    pub kinds: BTreeMap<String, KindSettings>,
}

pub const DEFAULT_MAX_JOBS: u32 = 200;

/// `poll.give_up_s`: ten minutes of `squeue` failing in a row outlasts a slurmctld restart or
/// failover, and is short enough that a broken `squeue` does not hold a run for hours.
pub const DEFAULT_GIVE_UP_S: f64 = 600.0;

/// The cheap kinds are batched by default: a threshold or a score takes well under a second,
/// less than Slurm takes to start a job.
pub fn default_batch() -> BTreeMap<String, u32> {
    [("threshold", 50), ("score", 50), ("filter", 10)].into_iter().map(|(k, n)| (k.to_string(), n)).collect()
}

impl ExecutorSpec {
    /// `self` (a profile) over `base` (the pipeline's block), field by field.
    pub fn over(self, base: ExecutorSpec) -> ExecutorSpec {
        let mut kinds = base.kinds;
        for (name, mine) in self.kinds {
            let merged = match kinds.remove(&name) {
                Some(theirs) => mine.over(theirs),
                None => mine,
            };
            kinds.insert(name, merged);
        }
        ExecutorSpec {
            kind: self.kind.or(base.kind),
            partition: self.partition.or(base.partition),
            account: self.account.or(base.account),
            qos: self.qos.or(base.qos),
            max_jobs: self.max_jobs.or(base.max_jobs),
            sbatch: self.sbatch.or(base.sbatch),
            arrays: self.arrays.or(base.arrays),
            on_controller: self.on_controller.or(base.on_controller),
            batch: self.batch.or(base.batch),
            poll_min_s: self.poll_min_s.or(base.poll_min_s),
            poll_max_s: self.poll_max_s.or(base.poll_max_s),
            poll_give_up_s: self.poll_give_up_s.or(base.poll_give_up_s),
            kinds,
        }
    }

    pub fn resolve(self) -> ExecutorConfig {
        let poll_min_s = self.poll_min_s.unwrap_or(0.5);
        ExecutorConfig {
            kind: self.kind.unwrap_or_default(),
            partition: self.partition,
            account: self.account,
            qos: self.qos,
            max_jobs: self.max_jobs.unwrap_or(DEFAULT_MAX_JOBS),
            sbatch: self.sbatch.unwrap_or_default(),
            arrays: self.arrays.unwrap_or(true),
            on_controller: self.on_controller.unwrap_or_default(),
            batch: self.batch.unwrap_or_else(default_batch),
            poll_min_s,
            poll_max_s: self.poll_max_s.unwrap_or(15.0).max(poll_min_s),
            poll_give_up_s: self.poll_give_up_s.unwrap_or(DEFAULT_GIVE_UP_S),
            kinds: self.kinds,
        }
    }
}

impl ExecutorConfig {
    /// The settings for an instance of `kind` in stage `stage`: the stage's entry wins over
    /// the kind's, field by field.
    pub fn settings(&self, stage: &str, kind: &str) -> KindSettings {
        let k = self.kinds.get(kind).cloned().unwrap_or_default();
        match self.kinds.get(stage) {
            None => k,
            Some(s) => s.clone().over(k),
        }
    }

    pub fn batch_size(&self, kind: &str) -> u32 {
        self.batch.get(kind).copied().unwrap_or(1).max(1)
    }
}

/// `512M`, `4G`, `1.5G`, `1T`, `800K` or a bare number of MiB (as sbatch's `--mem` reads it),
/// in MiB, rounded up.
pub fn parse_mem(s: &str) -> Result<u64, String> {
    let bad = || format!("expected a memory size like `512M`, `4G` or `4GiB` (a bare number is MiB, as sbatch reads it), found `{s}`");
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    // K, M, G, T with an optional `B` or `iB` (binary either way, as sbatch's), a bare `B`
    // for bytes, or nothing for MiB.
    let per_mib = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "M" | "MB" | "MIB" => 1.0,
        "B" => 1.0 / (1024.0 * 1024.0),
        "K" | "KB" | "KIB" => 1.0 / 1024.0,
        "G" | "GB" | "GIB" => 1024.0,
        "T" | "TB" | "TIB" => 1024.0 * 1024.0,
        _ => return Err(bad()),
    };
    let n: f64 = num.parse().map_err(|_| bad())?;
    let mib = (n * per_mib).ceil();
    if !(n > 0.0 && mib.is_finite() && mib <= u32::MAX as f64 * 1024.0) {
        return Err(bad());
    }
    Ok(mib as u64)
}

/// `90s`, `30m`, `2h`, `1d`, or one of sbatch's own `--time` forms: `MM:SS`, `HH:MM:SS`,
/// `D-HH`, `D-HH:MM`, `D-HH:MM:SS`; in seconds. A bare number is refused: sbatch reads it as
/// minutes, people often mean seconds, and `time: 3600` would silently ask for 60 hours.
pub fn parse_time(s: &str) -> Result<u64, String> {
    let bad = || {
        format!(
            "expected a duration like `90s`, `30m`, `2h`, or as sbatch writes it: `MM:SS`, `HH:MM:SS`, `D-HH`, `D-HH:MM` or `D-HH:MM:SS` (a bare number is ambiguous: sbatch reads minutes; write `90m` or `90s`); found `{s}`"
        )
    };
    let t = s.trim();
    let number = |p: &str| (!p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())).then(|| p.parse::<u64>().ok()).flatten();
    let secs = if let Some((days, rest)) = t.split_once('-') {
        // D-HH, D-HH:MM, D-HH:MM:SS: after the day, hours come first.
        let d = number(days).ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split(':').collect();
        if parts.len() > 3 {
            return Err(bad());
        }
        let mut hms = [0u64; 3];
        for (slot, p) in hms.iter_mut().zip(&parts) {
            *slot = number(p).ok_or_else(bad)?;
        }
        let [h, m, sec] = hms;
        d.checked_mul(24)
            .and_then(|x| x.checked_add(h)?.checked_mul(60)?.checked_add(m)?.checked_mul(60)?.checked_add(sec))
            .ok_or_else(bad)?
    } else if t.contains(':') {
        // MM:SS or HH:MM:SS.
        let parts: Vec<&str> = t.split(':').collect();
        if parts.len() > 3 {
            return Err(bad());
        }
        parts.iter().try_fold(0u64, |acc, p| number(p).and_then(|v| acc.checked_mul(60)?.checked_add(v))).ok_or_else(bad)?
    } else if number(t).is_some() {
        return Err(bad());
    } else {
        let (num, unit) = t.split_at(t.len().saturating_sub(1));
        let per = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86400,
            _ => return Err(bad()),
        };
        num.parse::<u64>().ok().and_then(|n| n.checked_mul(per)).ok_or_else(bad)?
    };
    if secs == 0 || secs > 366 * 86400 {
        return Err(bad());
    }
    Ok(secs)
}

/// Seconds as sbatch's `--time` reads them: `D-HH:MM:SS`, or `HH:MM:SS` under a day.
pub fn slurm_time(secs: u64) -> String {
    let (d, r) = (secs / 86400, secs % 86400);
    let hms = format!("{:02}:{:02}:{:02}", r / 3600, (r % 3600) / 60, r % 60);
    if d > 0 { format!("{d}-{hms}") } else { hms }
}

fn str_list(cx: &mut Ctx<'_>, path: &[&str], v: &Yaml) -> Option<Vec<String>> {
    match v {
        Yaml::Sequence(s) if s.iter().all(|x| x.is_string()) => Some(s.iter().filter_map(|x| x.as_str().map(str::to_string)).collect()),
        Yaml::Null => Some(Vec::new()),
        other => {
            cx.err(path, format!("expected a list of strings, found {}", type_name(other)));
            None
        }
    }
}

fn opt_str(cx: &mut Ctx<'_>, path: &[&str], v: &Yaml) -> Option<String> {
    match v {
        Yaml::Null => None,
        Yaml::String(s) if !s.trim().is_empty() => Some(s.clone()),
        other => {
            cx.err(path, format!("expected a name (string) or null, found {}", show_yaml(other)));
            None
        }
    }
}

fn count(cx: &mut Ctx<'_>, path: &[&str], v: &Yaml, min: u64, max: u64) -> Option<u32> {
    match v.as_u64() {
        Some(n) if (min..=max).contains(&n) => Some(n as u32),
        _ => {
            cx.err(path, format!("expected a whole number from {min} to {max}, found {}", show_yaml(v)));
            None
        }
    }
}

fn seconds(cx: &mut Ctx<'_>, path: &[&str], v: &Yaml) -> Option<f64> {
    match v.as_f64() {
        Some(f) if f > 0.0 && f <= 3600.0 => Some(f),
        _ => {
            cx.err(path, format!("expected a number of seconds in (0, 3600], found {}", show_yaml(v)));
            None
        }
    }
}

/// A `time:` or `mem:` value (string, or a bare number of MiB for `mem`).
pub(super) fn size_or_duration(cx: &mut Ctx<'_>, path: &[&str], v: &Yaml, is_time: bool) -> Option<u64> {
    let text = match v {
        Yaml::String(s) => s.clone(),
        Yaml::Number(n) => n.to_string(),
        other => {
            cx.err(
                path,
                format!("expected {}, found {}", if is_time { "a duration like `2h`" } else { "a size like `4G`" }, type_name(other)),
            );
            return None;
        }
    };
    match if is_time { parse_time(&text) } else { parse_mem(&text) } {
        Ok(n) => Some(n),
        Err(m) => {
            cx.err(path, m);
            None
        }
    }
}

fn kind_name(cx: &mut Ctx<'_>, path: &[&str], name: &str, kinds: &[&str], stages: Option<&[String]>) -> bool {
    let ok = kinds.contains(&name) || stages.is_some_and(|s| s.iter().any(|x| x == name));
    if !ok {
        let all: Vec<&str> = kinds.iter().copied().chain(stages.unwrap_or(&[]).iter().map(String::as_str)).collect();
        let hint = match crate::suggest::did_you_mean(name, all.iter().copied()) {
            Some(m) => format!("; did you mean `{m}`?"),
            None => format!(" (expected one of: {})", all.join(", ")),
        };
        let what = if stages.is_some() { "a stage kind or stage name" } else { "a stage kind" };
        cx.err(path, format!("`{name}` is not {what}{hint}"));
    }
    ok
}

/// Validates an `executor:` block at `path` (`["executor"]`). `stages`: the names a `kinds:`
/// entry may use besides kind names.
pub(super) fn parse_block(cx: &mut Ctx<'_>, v: &Yaml, catalog: &Catalog, stages: &[String]) -> ExecutorSpec {
    let mut spec = ExecutorSpec::default();
    let Yaml::Mapping(m) = v else {
        if !v.is_null() {
            cx.err(&["executor"], format!("expected a map like {{kind: slurm, partition: debug}}, found {}", type_name(v)));
        }
        return spec;
    };
    let kinds = catalog.names();
    for (k, v) in m {
        let k = key_str(k);
        let p = ["executor", k.as_str()];
        match k.as_str() {
            "kind" => match v.as_str().and_then(ExecutorKind::parse) {
                Some(x) => spec.kind = Some(x),
                None => cx.err(&p, format!("expected `local` or `slurm`, found {}", show_yaml(v))),
            },
            "partition" => spec.partition = opt_str(cx, &p, v),
            "account" => spec.account = opt_str(cx, &p, v),
            "qos" => spec.qos = opt_str(cx, &p, v),
            "max_jobs" => spec.max_jobs = count(cx, &p, v, 1, 1_000_000),
            "sbatch" => spec.sbatch = str_list(cx, &p, v),
            "arrays" => match v.as_bool() {
                Some(b) => spec.arrays = Some(b),
                None => cx.err(&p, format!("expected true or false, found {}", show_yaml(v))),
            },
            "on_controller" => {
                if let Some(list) = str_list(cx, &p, v) {
                    let ok = list.iter().filter(|n| kind_name(cx, &p, n, &kinds, None)).count() == list.len();
                    if ok {
                        spec.on_controller = Some(list);
                    }
                }
            }
            "batch" => match v {
                Yaml::Mapping(bm) => {
                    let mut out = BTreeMap::new();
                    for (bk, bv) in bm {
                        let bk = key_str(bk);
                        let bp = ["executor", "batch", bk.as_str()];
                        if kind_name(cx, &bp, &bk, &kinds, None)
                            && let Some(n) = count(cx, &bp, bv, 1, 100_000)
                        {
                            out.insert(bk, n);
                        }
                    }
                    spec.batch = Some(out);
                }
                other => cx.err(&p, format!("expected a map from stage kind to instances per job, found {}", type_name(other))),
            },
            "poll" => match v {
                Yaml::Mapping(pm) => {
                    for (pk, pv) in pm {
                        let pk = key_str(pk);
                        let pp = ["executor", "poll", pk.as_str()];
                        match pk.as_str() {
                            "min_s" => spec.poll_min_s = seconds(cx, &pp, pv),
                            "max_s" => spec.poll_max_s = seconds(cx, &pp, pv),
                            "give_up_s" => {
                                spec.poll_give_up_s = match pv.as_f64() {
                                    Some(f) if f > 0.0 && f <= 86400.0 => Some(f),
                                    _ => {
                                        cx.err(&pp, format!("expected a number of seconds in (0, 86400], found {}", show_yaml(pv)));
                                        None
                                    }
                                }
                            }
                            _ => cx.unknown_key(&["executor", "poll"], &pk, POLL_KEYS),
                        }
                    }
                }
                other => cx.err(&p, format!("expected a map like {{min_s: 0.5, max_s: 15, give_up_s: 600}}, found {}", type_name(other))),
            },
            "kinds" => match v {
                Yaml::Mapping(km) => {
                    for (kk, kv) in km {
                        let kk = key_str(kk);
                        let kp = ["executor", "kinds", kk.as_str()];
                        if !kind_name(cx, &kp, &kk, &kinds, Some(stages)) {
                            continue;
                        }
                        let Yaml::Mapping(fields) = kv else {
                            cx.err(&kp, format!("expected a map like {{time: 1h, mem: 4G, retries: 1}}, found {}", type_name(kv)));
                            continue;
                        };
                        let mut ks = KindSettings::default();
                        for (fk, fv) in fields {
                            let fk = key_str(fk);
                            let fp = ["executor", "kinds", kk.as_str(), fk.as_str()];
                            match fk.as_str() {
                                "time" => ks.time = size_or_duration(cx, &fp, fv, true),
                                "mem" => ks.mem = size_or_duration(cx, &fp, fv, false),
                                "retries" => ks.retries = count(cx, &fp, fv, 0, 100),
                                "sbatch" => ks.sbatch = str_list(cx, &fp, fv),
                                _ => cx.unknown_key(&kp, &fk, KIND_KEYS),
                            }
                        }
                        spec.kinds.insert(kk, ks);
                    }
                }
                other => cx.err(&p, format!("expected a map from stage kind (or stage name) to settings, found {}", type_name(other))),
            },
            _ => cx.unknown_key(&["executor"], &k, EXECUTOR_KEYS),
        }
    }
    spec
}

/// Reads a `--profile` file: a YAML map with one top-level key, `executor`. `stages`: the
/// stage names of the pipeline it is used with (a `kinds:` entry may name one).
pub fn load_profile(file: &Path, catalog: &Catalog, stages: &[String]) -> SpecResult<ExecutorSpec> {
    let one = |location: Option<(usize, usize)>, message: String| SpecErrors {
        file: file.to_path_buf(),
        errors: vec![SpecError { field: String::new(), location, message }],
    };
    let bytes = std::fs::read(file).map_err(|e| one(None, format!("cannot read profile: {e}")))?;
    let source = String::from_utf8(bytes).map_err(|_| one(None, "the profile is not valid UTF-8 text".into()))?;
    super::limits::check_size(&source)
        .map_err(|e| SpecErrors { file: file.to_path_buf(), errors: vec![super::yaml_syntax_error(&source, &e)] })?;
    let root: Yaml = serde_yaml::from_str(&source)
        .map_err(|e| SpecErrors { file: file.to_path_buf(), errors: vec![super::yaml_syntax_error(&source, &e)] })?;
    let mut cx = Ctx { source: &source, errors: Vec::new(), overridden: Vec::new() };
    let spec = match &root {
        Yaml::Mapping(top) => {
            for k in top.keys() {
                let k = key_str(k);
                if k != "executor" {
                    cx.unknown_key(&[], &k, &["executor"]);
                }
            }
            match top.get("executor") {
                Some(v) => parse_block(&mut cx, v, catalog, stages),
                None => {
                    cx.err(&[], "a profile needs a top-level `executor:` block");
                    ExecutorSpec::default()
                }
            }
        }
        other => {
            let at = locate::first_content(&source);
            return Err(one(Some(at), format!("a profile must be a map with an `executor:` block, found {}", type_name(other))));
        }
    };
    if cx.errors.is_empty() { Ok(spec) } else { Err(SpecErrors { file: file.to_path_buf(), errors: cx.errors }) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_mem("512M"), Ok(512));
        assert_eq!(parse_mem("4G"), Ok(4096));
        assert_eq!(parse_mem("1.5G"), Ok(1536));
        assert_eq!(parse_mem("4GiB"), Ok(4096));
        assert_eq!(parse_mem("100"), Ok(100));
        assert_eq!(parse_mem("1500K"), Ok(2));
        // Bytes are bytes (rounded up to a MiB), never MiB; a unit that is not one is refused.
        assert_eq!(parse_mem("512B"), Ok(1));
        assert_eq!(parse_mem("3gb"), Ok(3072));
        for bad in ["4iB", "4b5", "4 X", "G"] {
            assert!(parse_mem(bad).is_err(), "{bad}");
        }
        for bad in ["", "G", "-1G", "4X", "0M", "lots"] {
            assert!(parse_mem(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_time("90s"), Ok(90));
        assert_eq!(parse_time("30m"), Ok(1800));
        assert_eq!(parse_time("2h"), Ok(7200));
        assert_eq!(parse_time("01:00:00"), Ok(3600));
        assert_eq!(parse_time("1:30"), Ok(90));
        // Slurm's own forms (finding 11), including what `slurm_time` writes.
        assert_eq!(parse_time("1-00:00:00"), Ok(86400));
        assert_eq!(parse_time("2-12"), Ok(2 * 86400 + 12 * 3600));
        assert_eq!(parse_time("1-02:30"), Ok(86400 + 2 * 3600 + 30 * 60));
        assert_eq!(parse_time("36:00:00"), Ok(36 * 3600));
        assert!(parse_time("90").is_err(), "a bare number is ambiguous (sbatch: minutes; people: seconds)");
        assert_eq!(parse_time(&slurm_time(90000)), Ok(90000));
        for bad in
            ["", "1:2:3:4", "h", "0s", "0", "1::2", "-5m", "400d", "1-", "-1", "1-2:3:4:5", "1-x", "a-1", "1.5", "1-0:307445734561825860"]
        {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
        assert_eq!(slurm_time(90), "00:01:30");
        assert_eq!(slurm_time(90000), "1-01:00:00");
    }

    fn parse_profile(text: &str) -> SpecResult<ExecutorSpec> {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("profile.yaml");
        std::fs::write(&f, text).unwrap();
        load_profile(&f, &crate::stages::catalog(), &["train_big".to_string()])
    }

    #[test]
    fn a_profile_parses_and_wins_field_by_field() {
        let prof = parse_profile(
            "executor:\n  kind: slurm\n  partition: debug\n  max_jobs: 8\n  arrays: false\n  batch: {threshold: 20}\n  kinds:\n    train: {time: 1h, mem: 4G, retries: 2, sbatch: [--exclusive]}\n    train_big: {mem: 8G}\n",
        )
        .expect("valid");
        let pipeline = ExecutorSpec {
            partition: Some("long".into()),
            qos: Some("low".into()),
            kinds: [("train".to_string(), KindSettings { time: Some(60), ..Default::default() })].into_iter().collect(),
            ..Default::default()
        };
        let c = prof.over(pipeline).resolve();
        assert_eq!(c.kind, ExecutorKind::Slurm);
        assert_eq!(c.partition.as_deref(), Some("debug"));
        assert_eq!(c.qos.as_deref(), Some("low"), "a field the profile leaves out comes from the pipeline");
        assert_eq!((c.max_jobs, c.arrays, c.batch_size("threshold"), c.batch_size("score")), (8, false, 20, 1));
        let s = c.settings("train_big", "train");
        assert_eq!((s.time, s.mem, s.retries), (Some(3600), Some(8192), Some(2)), "stage entry over kind entry");
        assert_eq!(ExecutorSpec::default().resolve().batch_size("score"), 50);
        assert_eq!(c.poll_give_up_s, DEFAULT_GIVE_UP_S);
    }

    /// Finding 5: the profile's `kinds.train: {mem: 1G}` keeps the pipeline's `time` and
    /// `retries` for `train` (before, the whole entry was replaced).
    #[test]
    fn a_profile_kinds_entry_merges_field_by_field() {
        let prof = parse_profile("executor:\n  kinds:\n    train: {mem: 1G}\n").expect("valid");
        let pipeline = ExecutorSpec {
            kinds: [("train".to_string(), KindSettings { time: Some(3600), retries: Some(2), mem: Some(512), ..Default::default() })]
                .into_iter()
                .collect(),
            ..Default::default()
        };
        let s = prof.over(pipeline).resolve().settings("train", "train");
        assert_eq!(s, KindSettings { time: Some(3600), mem: Some(1024), retries: Some(2), sbatch: None });
    }

    #[test]
    fn squeue_give_up_time_parses_and_is_checked() {
        let p = parse_profile("executor:\n  poll: {give_up_s: 30}\n").expect("valid");
        assert_eq!(p.resolve().poll_give_up_s, 30.0);
        let e = parse_profile("executor:\n  poll: {give_up_s: 0}\n").expect_err("zero");
        assert!(e.to_string().contains("executor.poll.give_up_s: expected a number of seconds in (0, 86400], found `0`"), "{e}");
    }

    #[test]
    fn profile_errors_name_the_line_and_field() {
        let e = parse_profile("executor:\n  kind: slurm\n  max_job: 3\n  kinds:\n    trian: {time: 1h}\n    train: {time: 90x, mem: 4X}\n")
            .expect_err("invalid");
        let text = e.to_string();
        assert!(text.contains("profile.yaml:3:3: executor.max_job: unknown key `max_job`; did you mean `max_jobs`?"), "{text}");
        assert!(text.contains(":5:5: executor.kinds.trian: `trian` is not a stage kind or stage name; did you mean `train`?"), "{text}");
        assert!(text.contains("executor.kinds.train.time: expected a duration"), "{text}");
        assert!(text.contains("executor.kinds.train.mem: expected a memory size"), "{text}");
        assert!(e.errors.iter().all(|x| x.location.is_some()), "{text}");
        let e = parse_profile("partition: x\n").expect_err("no block");
        assert!(e.to_string().contains("needs a top-level `executor:` block"), "{e}");
    }
}
