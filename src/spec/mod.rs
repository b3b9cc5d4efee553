//! Pipeline specs: the YAML a user writes, validated into [`Pipeline`].
//!
//! The only module that knows YAML. Loading parses the text into a generic YAML value (so
//! syntax errors carry serde_yaml's line and column), applies `--set` overrides, then walks
//! the value by hand so that *every* problem of a file is collected in one pass, each with its
//! field path, its location and a "did you mean" where a name is misspelt.

mod error;
pub mod executor;
mod limits;
mod locate;
mod overrides;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value as Json;
use serde_yaml::Value as Yaml;

pub use error::{SpecError, SpecErrors, SpecResult};
pub use executor::{ExecutorConfig, ExecutorKind, ExecutorSpec};
pub use limits::MAX_NODES;
pub use locate::{locate, locate_or_nearest};
pub use overrides::{Override, apply_override};

use crate::stage_kind::{Catalog, Resources};
use crate::suggest::did_you_mean;
use crate::sweep::show_value;

/// A validated pipeline. Stage params here are as written (type-checked, canonical), not yet
/// merged with defaults; `sweep` resolves them per instance.
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub name: String,
    pub file: PathBuf,
    /// Folder of the pipeline file: relative data paths resolve against it.
    pub base_dir: PathBuf,
    pub seed: u64,
    pub backend: String,
    /// Per stage kind: param defaults that override the kind's own.
    pub defaults: BTreeMap<String, BTreeMap<String, Json>>,
    pub stages: BTreeMap<String, StageSpec>,
    /// The `executor:` block as written (empty when absent): where instances run. Never part
    /// of a key: the same study gives the same results wherever it runs.
    pub executor: ExecutorSpec,
    /// The spec text after overrides, for the report and the lock file.
    pub source: String,
}

#[derive(Debug, Clone)]
pub struct StageSpec {
    pub name: String,
    pub kind: String,
    pub params: BTreeMap<String, Json>,
    /// Input slot -> upstream stage name.
    pub inputs: BTreeMap<String, String>,
    /// Cartesian axes, in the order written.
    pub grid: Vec<(String, Vec<Json>)>,
    /// Paired axes of equal length.
    pub zip: Vec<(String, Vec<Json>)>,
    pub resources: Resources,
    /// Params taken from an upstream stage, written `${stage.param}`: (param, stage, param).
    pub refs: Vec<ParamRef>,
}

/// `param: ${stage.param}`: the value of an upstream stage's param (its sweep value, if it
/// sweeps it), so e.g. `retrain` trains the same architecture as the `train` upstream of it.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamRef {
    pub param: String,
    pub stage: String,
    pub upstream_param: String,
}

/// The characters a stage name cannot hold: `${stage.param}` and `--set stages.NAME.…` split
/// at the first `.`, `${…}` ends at `}`, and instance labels put `[`, `=`, `,` and `]` after the
/// name. Anything else (any language's letters, `/`, `+`) is fine and is kept, so that specs
/// written before this rule still parse.
pub const STAGE_NAME_FORBIDDEN: &[char] = &['.', '[', ']', '=', ',', '$', '{', '}'];

/// Why `name` cannot name a stage, if it cannot (see [`STAGE_NAME_FORBIDDEN`]; also blanks and
/// control characters, which no one can type back, and the empty name).
pub fn bad_stage_name(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("a stage name must not be empty".into());
    }
    let bad: String = name.chars().filter(|c| STAGE_NAME_FORBIDDEN.contains(c) || c.is_whitespace() || c.is_control()).collect();
    (!bad.is_empty()).then(|| {
        let mut shown: Vec<String> = bad.chars().map(|c| format!("`{}`", c.escape_default())).collect();
        shown.dedup();
        format!(
            "stage name `{}` contains {}, which `${{stage.param}}`, `--set stages.…` or instance labels could not tell apart; \
             a stage name may not hold `.`, `[`, `]`, `=`, `,`, `$`, `{{`, `}}` or blanks",
            name.escape_default(),
            shown.join(", ")
        )
    })
}

/// Parses `${stage.param}`.
fn as_ref(v: &Yaml) -> Option<(String, String)> {
    let s = v.as_str()?.trim();
    let inner = s.strip_prefix("${")?.strip_suffix('}')?;
    let (st, p) = inner.split_once('.')?;
    Some((st.trim().to_string(), p.trim().to_string()))
}

pub(crate) const TOP_KEYS: &[&str] = &["name", "seed", "backend", "defaults", "stages", "executor", "description"];
pub(crate) const STAGE_KEYS: &[&str] = &["kind", "params", "inputs", "sweep", "seeds", "resources", "description"];
/// Most repetitions `seeds: N` may ask for; more is a typo, not a study.
pub const MAX_SEEDS: u64 = 1000;
pub(crate) const SWEEP_KEYS: &[&str] = &["grid", "zip"];
/// The numeric backends a pipeline may name (as `ml::backend::NAMES`, checked by a test there;
/// whether this binary has one compiled in is the CLI's question, not the spec's).
pub const BACKENDS: &[&str] = &["cpu", "cuda", "wgpu"];
/// The most CPU slots or whole GPUs a stage may ask for.
const MAX_RESOURCE_COUNT: u64 = 1024;
pub(crate) const RESOURCE_KEYS: &[&str] = &["cpu", "gpu", "mem", "time"];

struct Ctx<'a> {
    source: &'a str,
    errors: Vec<SpecError>,
    /// Field paths given by `--set`: their values are not in the file.
    overridden: Vec<String>,
}

impl Ctx<'_> {
    fn err(&mut self, path: &[&str], message: impl Into<String>) {
        let field = path.join(".");
        let from_set = self.overridden.iter().any(|o| field == *o || field.starts_with(&format!("{o}.")));
        let (location, message) = if from_set {
            (None, format!("{} (value from --set)", message.into()))
        } else {
            (Some(locate::locate_or_nearest(self.source, path)), message.into())
        };
        self.errors.push(SpecError { field, location, message });
    }

    fn unknown_key(&mut self, path: &[&str], key: &str, allowed: &[&str]) {
        let mut p = path.to_vec();
        p.push(key);
        let hint = match did_you_mean(key, allowed.iter().copied()) {
            Some(m) => format!("; did you mean `{m}`?"),
            None => format!(" (expected one of: {})", allowed.join(", ")),
        };
        self.err(&p, format!("unknown key `{key}`{hint}"));
    }
}

fn key_str(k: &Yaml) -> String {
    match k {
        Yaml::String(s) => s.clone(),
        other => serde_yaml::to_string(other).unwrap_or_default().trim().to_string(),
    }
}

/// YAML scalar/sequence/map -> JSON (canonical params live as JSON).
pub fn to_json(v: &Yaml) -> Json {
    match v {
        Yaml::Null => Json::Null,
        Yaml::Bool(b) => Json::Bool(*b),
        Yaml::Number(n) => {
            if let Some(i) = n.as_i64() {
                Json::from(i)
            } else if let Some(u) = n.as_u64() {
                Json::from(u)
            } else {
                Json::from(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Yaml::String(s) => Json::String(s.clone()),
        Yaml::Sequence(s) => Json::Array(s.iter().map(to_json).collect()),
        Yaml::Mapping(m) => Json::Object(m.iter().map(|(k, v)| (key_str(k), to_json(v))).collect()),
        Yaml::Tagged(t) => to_json(&t.value),
    }
}

/// A serde_yaml error as a spec error, always with a line and column: serde_yaml gives none
/// for a second document or too many alias repetitions, so those are found in the text.
fn yaml_syntax_error(source: &str, e: &serde_yaml::Error) -> SpecError {
    let msg = e.to_string();
    // serde_yaml appends " at line X column Y"; we print the location ourselves.
    let msg = match msg.find(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg,
    };
    let (location, message) = if msg.contains("more than one document") {
        (
            locate::second_document(source).unwrap_or_else(|| locate::first_content(source)),
            "a pipeline file holds one YAML document, but a second one starts here; remove the `---` or split the file".to_string(),
        )
    } else if msg.contains("repetition limit exceeded") {
        (
            locate::first_alias(source).unwrap_or_else(|| locate::first_content(source)),
            "YAML aliases expand to too many repetitions (an alias bomb?); write the values out or use fewer aliases".to_string(),
        )
    } else if let Some((field, key)) = duplicate_key_of(&msg) {
        let map = e.location().map(|l| (l.line(), l.column())).unwrap_or_else(|| locate::first_content(source));
        let at = locate::duplicate_key(source, map, &key).unwrap_or(map);
        (at, format!("{field}`{key}` is set twice in one mapping; keep one of them"))
    } else if let Some(m) = too_large_number(&msg) {
        (e.location().map(|l| (l.line(), l.column())).unwrap_or_else(|| locate::first_content(source)), m)
    } else {
        let at = e.location().map(|l| (l.line(), l.column())).unwrap_or_else(|| locate::first_content(source));
        (at, format!("YAML syntax error: {msg}"))
    };
    SpecError { field: String::new(), location: Some(location), message }
}

/// The field path and the key of serde_yaml's "<path>: duplicate entry with key \"K\"".
fn duplicate_key_of(msg: &str) -> Option<(String, String)> {
    let i = msg.find("duplicate entry with key \"")?;
    let key = msg[i + "duplicate entry with key \"".len()..].strip_suffix('"')?;
    Some((msg[..i].to_string(), key.to_string()))
}

/// serde_yaml's words for an integer beyond 64 bits ("invalid type: integer `N` as u128,
/// expected any YAML value", with the field path before them), said for people.
pub fn too_large_number(msg: &str) -> Option<String> {
    let i = msg.find("invalid type: integer `")?;
    let rest = &msg[i + "invalid type: integer `".len()..];
    let (n, tail) = rest.split_once('`')?;
    if !(tail.starts_with(" as u128") || tail.starts_with(" as i128")) {
        return None;
    }
    Some(format!("{}the number {n} is too large: numbers must lie between -2^63 and 2^64 - 1", &msg[..i]))
}

fn type_name(v: &Yaml) -> &'static str {
    match v {
        Yaml::Null => "nothing",
        Yaml::Bool(_) => "a boolean",
        Yaml::Number(_) => "a number",
        Yaml::String(_) => "a string",
        Yaml::Sequence(_) => "a list",
        Yaml::Mapping(_) => "a map",
        Yaml::Tagged(_) => "a tagged value",
    }
}

/// Reads, overrides and validates a pipeline file.
pub fn load(file: &Path, overrides: &[Override], catalog: &Catalog) -> SpecResult<Pipeline> {
    let one = |message: String| SpecErrors {
        file: file.to_path_buf(),
        errors: vec![SpecError { field: String::new(), location: None, message }],
    };
    let bytes = std::fs::read(file).map_err(|e| one(format!("cannot read pipeline: {e}")))?;
    parse_bytes(file, &bytes, overrides, catalog)
}

/// Validates pipeline bytes: like [`parse`], but first checks they are UTF-8, naming the line
/// and column of the first byte that is not (serde_yaml would only say "invalid UTF-8").
pub fn parse_bytes(file: &Path, bytes: &[u8], overrides: &[Override], catalog: &Catalog) -> SpecResult<Pipeline> {
    match std::str::from_utf8(bytes) {
        Ok(source) => parse(file, source, overrides, catalog),
        Err(e) => {
            let valid = &bytes[..e.valid_up_to()];
            let line_start = valid.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            let line = valid.iter().filter(|&&b| b == b'\n').count() + 1;
            // Valid prefix, so this never fails; the column counts characters, as editors do.
            let col = std::str::from_utf8(&valid[line_start..]).map_or(1, |s| s.chars().count() + 1);
            Err(SpecErrors {
                file: file.to_path_buf(),
                errors: vec![SpecError {
                    field: String::new(),
                    location: Some((line, col)),
                    message: format!(
                        "the file is not valid UTF-8 (byte 0x{:02x}); save it as UTF-8 text",
                        bytes.get(e.valid_up_to()).copied().unwrap_or(0)
                    ),
                }],
            })
        }
    }
}

/// Validates pipeline text; `file` is used for messages and relative paths only.
pub fn parse(file: &Path, source: &str, overrides: &[Override], catalog: &Catalog) -> SpecResult<Pipeline> {
    // A leading byte order mark is legal YAML (editors on Windows write one); serde_yaml takes
    // it for the start of a second document. Editors show no column for it, so stripping it
    // keeps every line and column as the user sees them.
    let source = source.strip_prefix('\u{feff}').unwrap_or(source);
    let fail = |errors: Vec<SpecError>| SpecErrors { file: file.to_path_buf(), errors };
    let yaml_error = |e: serde_yaml::Error| fail(vec![yaml_syntax_error(source, &e)]);
    // A first pass that only counts nodes, aliases expanded, so that an alias bomb stops at
    // MAX_NODES instead of building a tree of billions of nodes.
    limits::check_size(source).map_err(yaml_error)?;
    let mut root: Yaml = serde_yaml::from_str(source).map_err(yaml_error)?;
    let mut cx = Ctx { source, errors: Vec::new(), overridden: overrides.iter().map(|o| o.path.clone()).collect() };
    for o in overrides {
        if let Err(m) = apply_override(&mut root, o) {
            cx.errors.push(SpecError { field: o.path.clone(), location: None, message: format!("--set: {m}") });
        }
    }
    let Yaml::Mapping(top) = &root else {
        return Err(fail(vec![SpecError {
            field: String::new(),
            location: Some(locate::first_content(source)),
            message: format!("a pipeline must be a map with `name` and `stages`, found {}", type_name(&root)),
        }]));
    };
    for k in top.keys() {
        let k = key_str(k);
        if !TOP_KEYS.contains(&k.as_str()) {
            cx.unknown_key(&[], &k, TOP_KEYS);
        }
    }
    let name = match top.get("name") {
        Some(Yaml::String(s)) if !s.trim().is_empty() => s.clone(),
        Some(v) => {
            cx.err(&["name"], format!("expected a non-empty string, found {}", type_name(v)));
            String::new()
        }
        None => {
            cx.err(&[], "missing required key `name`");
            String::new()
        }
    };
    let seed = match top.get("seed") {
        None => 0,
        Some(v) => match v.as_u64() {
            Some(s) => s,
            None => {
                cx.err(&["seed"], format!("expected a non-negative integer, found {}", type_name(v)));
                0
            }
        },
    };
    let backend = match top.get("backend") {
        None => "cpu".to_string(),
        Some(Yaml::String(s)) if BACKENDS.contains(&s.as_str()) => s.clone(),
        Some(v) => {
            cx.err(&["backend"], format!("expected one of `cpu`, `cuda`, `wgpu`, found {}", show_yaml(v)));
            "cpu".into()
        }
    };
    let mut defaults = BTreeMap::new();
    if let Some(d) = top.get("defaults") {
        match d {
            Yaml::Mapping(m) => {
                for (k, v) in m {
                    let kind = key_str(k);
                    let Some(sk) = catalog.get(&kind) else {
                        cx.unknown_key(&["defaults"], &kind, &catalog.names());
                        continue;
                    };
                    let specs = sk.params();
                    let mut out = BTreeMap::new();
                    match v {
                        Yaml::Mapping(pm) => {
                            for (pk, pv) in pm {
                                let p = key_str(pk);
                                check_param(&mut cx, &["defaults", &kind, &p], &specs, &p, pv, &mut out);
                            }
                        }
                        other => cx.err(&["defaults", &kind], format!("expected a map of params, found {}", type_name(other))),
                    }
                    defaults.insert(kind, out);
                }
            }
            other => cx.err(&["defaults"], format!("expected a map from stage kind to params, found {}", type_name(other))),
        }
    }
    let mut stages = BTreeMap::new();
    match top.get("stages") {
        None => cx.err(&[], "missing required key `stages`"),
        Some(Yaml::Mapping(m)) if m.is_empty() => cx.err(&["stages"], "a pipeline needs at least one stage"),
        Some(Yaml::Mapping(m)) => {
            let names: Vec<String> = m.keys().map(key_str).collect();
            for (k, v) in m {
                let sname = key_str(k);
                if let Some(why) = bad_stage_name(&sname) {
                    cx.err(&["stages", &sname], why);
                }
                if let Some(s) = stage(&mut cx, &sname, v, &names, m, catalog, seed) {
                    stages.insert(sname, s);
                }
            }
        }
        Some(v) => cx.err(&["stages"], format!("expected a map of named stages, found {}", type_name(v))),
    }
    let executor = match top.get("executor") {
        Some(v) => {
            let names: Vec<String> = match top.get("stages") {
                Some(Yaml::Mapping(m)) => m.keys().map(key_str).collect(),
                _ => Vec::new(),
            };
            executor::parse_block(&mut cx, v, catalog, &names)
        }
        None => ExecutorSpec::default(),
    };
    if cx.errors.is_empty() {
        check_refs(&mut cx, &stages, catalog);
    }
    if cx.errors.is_empty()
        && let Err(cycle) = crate::dag::stage_cycle(&stages)
    {
        let first = cycle.first().cloned().unwrap_or_default();
        cx.err(&["stages", &first, "inputs"], format!("dependency cycle: {}", cycle.join(" -> ")));
    }
    if !cx.errors.is_empty() {
        return Err(fail(cx.errors));
    }
    let base_dir = file.parent().map(|p| if p.as_os_str().is_empty() { Path::new(".") } else { p }).unwrap_or(Path::new(".")).to_path_buf();
    let source =
        if overrides.is_empty() { source.to_string() } else { serde_yaml::to_string(&root).unwrap_or_else(|_| source.to_string()) };
    Ok(Pipeline { name, file: file.to_path_buf(), base_dir, seed, backend, defaults, stages, executor, source })
}

/// Data a stage cannot read (a missing root, an unreadable manifest) as a spec error at the
/// param that names it, so the message gives file:line:col like any other spec error.
pub fn data_error(p: &Pipeline, stage: &str, message: &str) -> SpecErrors {
    let params = p.stages.get(stage).map(|s| &s.params);
    let field: Vec<&str> = match ["root", "manifest"].into_iter().find(|k| params.is_some_and(|m| m.contains_key(*k))) {
        Some(k) => vec!["stages", stage, "params", k],
        None => vec!["stages", stage],
    };
    let location = Some(locate_or_nearest(&p.source, &field));
    let message = format!("stage `{stage}` cannot read its data: {message}");
    SpecErrors { file: p.file.clone(), errors: vec![SpecError { field: field.join("."), location, message }] }
}

fn ancestors(stages: &BTreeMap<String, StageSpec>, of: &str) -> Vec<String> {
    let mut seen: Vec<String> = Vec::new();
    let mut todo: Vec<String> = stages.get(of).map(|s| s.inputs.values().cloned().collect()).unwrap_or_default();
    while let Some(n) = todo.pop() {
        if seen.contains(&n) {
            continue;
        }
        if let Some(s) = stages.get(&n) {
            todo.extend(s.inputs.values().cloned());
        }
        seen.push(n);
    }
    seen
}

fn check_refs(cx: &mut Ctx<'_>, stages: &BTreeMap<String, StageSpec>, catalog: &Catalog) {
    for s in stages.values() {
        for r in &s.refs {
            let path = ["stages", s.name.as_str(), "params", r.param.as_str()];
            let anc = ancestors(stages, &s.name);
            let Some(up) = stages.get(&r.stage).filter(|_| anc.contains(&r.stage)) else {
                let hint = match did_you_mean(&r.stage, anc.iter().map(|a| a.as_str())) {
                    Some(m) => format!("; did you mean `{m}`?"),
                    None => String::new(),
                };
                cx.err(&path, format!("`${{{}.{}}}`: `{}` is not upstream of `{}`{hint}", r.stage, r.upstream_param, r.stage, s.name));
                continue;
            };
            let mine = catalog.get(&s.kind).and_then(|k| k.params().into_iter().find(|p| p.name == r.param)).map(|p| p.ty);
            let theirs = catalog.get(&up.kind).and_then(|k| k.params().into_iter().find(|p| p.name == r.upstream_param)).map(|p| p.ty);
            match theirs {
                None => cx.err(
                    &path,
                    format!(
                        "`${{{}.{}}}`: stage `{}` ({}) has no param `{}`",
                        r.stage, r.upstream_param, r.stage, up.kind, r.upstream_param
                    ),
                ),
                Some(t) if Some(t) != mine => cx.err(
                    &path,
                    format!(
                        "`${{{}.{}}}` is {}, but `{}` needs {}",
                        r.stage,
                        r.upstream_param,
                        t.describe(),
                        r.param,
                        mine.map(|m| m.describe()).unwrap_or_default()
                    ),
                ),
                Some(_) => {}
            }
        }
    }
}

/// The first value equal to an earlier one, as (earlier index, index).
fn first_repeat(values: &[String]) -> Option<(usize, usize)> {
    let mut seen: std::collections::HashMap<&str, usize> = std::collections::HashMap::with_capacity(values.len());
    for (i, v) in values.iter().enumerate() {
        if let Some(&first) = seen.get(v.as_str()) {
            return Some((first, i));
        }
        seen.insert(v, i);
    }
    None
}

fn show_yaml(v: &Yaml) -> String {
    match v {
        Yaml::String(s) => format!("`{s}`"),
        Yaml::Number(n) => format!("`{n}`"),
        Yaml::Bool(b) => format!("`{b}`"),
        other => type_name(other).to_string(),
    }
}

/// `ty.check` of a YAML value, saying what it found where JSON cannot: NaN and infinities
/// (`.nan`, `.inf`) have no JSON form and would be reported as "nothing".
fn check_value(ty: &crate::stage_kind::ParamType, v: &Yaml) -> Result<Json, String> {
    fn non_finite(v: &Yaml) -> Option<f64> {
        match v {
            Yaml::Number(n) => n.as_f64().filter(|f| !f.is_finite()),
            Yaml::Sequence(s) => s.iter().find_map(non_finite),
            Yaml::Tagged(t) => non_finite(&t.value),
            _ => None,
        }
    }
    match non_finite(v) {
        Some(f) => {
            let what = if f.is_nan() { "NaN (`.nan`)" } else { "an infinity (`.inf`)" };
            let inside = if v.is_sequence() { "a list holding " } else { "" };
            Err(format!("expected {}, found {inside}{what}: params must be finite numbers", ty.describe()))
        }
        None => ty.check(&to_json(v)),
    }
}

fn check_param(
    cx: &mut Ctx<'_>,
    path: &[&str],
    specs: &[crate::stage_kind::ParamSpec],
    name: &str,
    v: &Yaml,
    out: &mut BTreeMap<String, Json>,
) {
    let Some(spec) = specs.iter().find(|s| s.name == name) else {
        let names: Vec<&str> = specs.iter().map(|s| s.name).collect();
        cx.unknown_key(&path[..path.len() - 1], name, &names);
        return;
    };
    match check_value(&spec.ty, v) {
        Ok(j) => {
            out.insert(name.to_string(), j);
        }
        Err(m) => cx.err(path, m),
    }
}

fn stage(
    cx: &mut Ctx<'_>,
    sname: &str,
    v: &Yaml,
    names: &[String],
    all: &serde_yaml::Mapping,
    catalog: &Catalog,
    pipeline_seed: u64,
) -> Option<StageSpec> {
    let base = ["stages", sname];
    let Yaml::Mapping(m) = v else {
        cx.err(&base, format!("expected a map with `kind`, found {}", type_name(v)));
        return None;
    };
    for k in m.keys() {
        let k = key_str(k);
        if !STAGE_KEYS.contains(&k.as_str()) {
            cx.unknown_key(&base, &k, STAGE_KEYS);
        }
    }
    let kind_name = match m.get("kind") {
        Some(Yaml::String(s)) => s.clone(),
        Some(other) => {
            cx.err(&["stages", sname, "kind"], format!("expected a stage kind name, found {}", type_name(other)));
            return None;
        }
        None => {
            cx.err(&base, format!("missing required key `kind` (one of: {})", catalog.names().join(", ")));
            return None;
        }
    };
    let Some(kind) = catalog.get(&kind_name) else {
        let hint = match did_you_mean(&kind_name, catalog.names()) {
            Some(m) => format!("; did you mean `{m}`?"),
            None => format!(" (known kinds: {})", catalog.names().join(", ")),
        };
        cx.err(&["stages", sname, "kind"], format!("unknown stage kind `{kind_name}`{hint}"));
        return None;
    };
    let specs = kind.params();
    let mut params = BTreeMap::new();
    let mut refs = Vec::new();
    match m.get("params") {
        None | Some(Yaml::Null) => {}
        Some(Yaml::Mapping(pm)) => {
            for (pk, pv) in pm {
                let p = key_str(pk);
                if let Some((st, up)) = as_ref(pv) {
                    if !specs.iter().any(|s| s.name == p) {
                        let names: Vec<&str> = specs.iter().map(|s| s.name).collect();
                        cx.unknown_key(&["stages", sname, "params"], &p, &names);
                    } else {
                        refs.push(ParamRef { param: p, stage: st, upstream_param: up });
                    }
                    continue;
                }
                check_param(cx, &["stages", sname, "params", &p], &specs, &p, pv, &mut params);
            }
        }
        Some(other) => cx.err(&["stages", sname, "params"], format!("expected a map of params, found {}", type_name(other))),
    }
    // Inputs: slot -> stage, typed.
    let mut inputs = BTreeMap::new();
    match m.get("inputs") {
        None | Some(Yaml::Null) => {}
        Some(Yaml::Mapping(im)) => {
            for (ik, iv) in im {
                let slot_name = key_str(ik);
                let path = ["stages", sname, "inputs", slot_name.as_str()];
                let Some(slot) = kind.inputs().iter().find(|s| s.name == slot_name) else {
                    let slots: Vec<&str> = kind.inputs().iter().map(|s| s.name).collect();
                    cx.unknown_key(&path[..3], &slot_name, &slots);
                    continue;
                };
                let Yaml::String(target) = iv else {
                    cx.err(&path, format!("expected the name of a stage, found {}", type_name(iv)));
                    continue;
                };
                if !names.contains(target) {
                    let hint = match did_you_mean(target, names.iter().map(|s| s.as_str())) {
                        Some(m) => format!("; did you mean `{m}`?"),
                        None => String::new(),
                    };
                    cx.err(&path, format!("unknown stage `{target}`{hint} (stages: {})", names.join(", ")));
                    continue;
                }
                // Type check against the upstream kind's output.
                if let Some(up_kind) =
                    all.get(target.as_str()).and_then(|u| u.get("kind")).and_then(|k| k.as_str()).and_then(|k| catalog.get(k))
                    && up_kind.output() != slot.artifact
                {
                    cx.err(
                        &path,
                        format!(
                            "stage `{target}` ({}) produces {}, but input `{}` of {} needs {}",
                            up_kind.name(),
                            up_kind.output().name(),
                            slot.name,
                            kind.name(),
                            slot.artifact.name()
                        ),
                    );
                    continue;
                }
                inputs.insert(slot_name, target.clone());
            }
        }
        Some(other) => cx.err(&["stages", sname, "inputs"], format!("expected a map from input name to stage, found {}", type_name(other))),
    }
    for slot in kind.inputs() {
        if slot.required
            && !inputs.contains_key(slot.name)
            && !cx.errors.iter().any(|e| e.field.starts_with(&format!("stages.{sname}.inputs")))
        {
            cx.err(
                &["stages", sname, "inputs"],
                format!("missing required input `{}` ({}) of {}", slot.name, slot.artifact.name(), kind.name()),
            );
        }
    }
    if !cx.errors.iter().any(|e| e.field.starts_with(&format!("stages.{sname}.inputs")))
        && let Some(m) = kind.check_inputs(&inputs.keys().map(String::as_str).collect::<Vec<_>>())
    {
        cx.err(&["stages", sname, "inputs"], m);
    }
    // Sweep axes.
    let (mut grid, mut zip) = (Vec::new(), Vec::new());
    match m.get("sweep") {
        None | Some(Yaml::Null) => {}
        Some(Yaml::Mapping(sm)) => {
            for (sk, sv) in sm {
                let sk = key_str(sk);
                if !SWEEP_KEYS.contains(&sk.as_str()) {
                    cx.unknown_key(&["stages", sname, "sweep"], &sk, SWEEP_KEYS);
                    continue;
                }
                let Yaml::Mapping(axes) = sv else {
                    cx.err(
                        &["stages", sname, "sweep", &sk],
                        format!("expected a map from param to a list of values, found {}", type_name(sv)),
                    );
                    continue;
                };
                let target = if sk == "grid" { &mut grid } else { &mut zip };
                for (ak, av) in axes {
                    let axis = key_str(ak);
                    let path = ["stages", sname, "sweep", sk.as_str(), axis.as_str()];
                    let Some(spec) = specs.iter().find(|s| s.name == axis) else {
                        let pnames: Vec<&str> = specs.iter().map(|s| s.name).collect();
                        cx.unknown_key(&path[..4], &axis, &pnames);
                        continue;
                    };
                    let Yaml::Sequence(vals) = av else {
                        cx.err(&path, format!("expected a list of values, found {}", type_name(av)));
                        continue;
                    };
                    if vals.is_empty() {
                        cx.err(&path, "sweep axis is empty; give at least one value");
                        continue;
                    }
                    let mut checked = Vec::new();
                    for (i, v) in vals.iter().enumerate() {
                        match check_value(&spec.ty, v) {
                            Ok(j) => checked.push(j),
                            Err(msg) => cx.err(&path, format!("value {}: {msg}", i + 1)),
                        }
                    }
                    // Two equal values would make two instances with one label (and one key).
                    // Zipped axes may repeat values: their rows are checked below.
                    if sk == "grid"
                        && checked.len() == vals.len()
                        && let Some((first, again)) = first_repeat(&checked.iter().map(show_value).collect::<Vec<_>>())
                    {
                        cx.err(
                            &path,
                            format!(
                                "value {} (`{}`) repeats value {}; sweep values must be distinct",
                                again + 1,
                                show_value(&checked[again]),
                                first + 1
                            ),
                        );
                    }
                    if params.contains_key(&axis) {
                        cx.err(&path, format!("`{axis}` is both a fixed param and a sweep axis; keep one"));
                    }
                    target.push((axis, checked));
                }
            }
        }
        Some(other) => cx.err(&["stages", sname, "sweep"], format!("expected a map with `grid` and/or `zip`, found {}", type_name(other))),
    }
    // `seeds: N`: shorthand for a grid axis `seed: [S, S+1, ..., S+N-1]`, S the pipeline seed,
    // so repetitions are ordinary instances (own keys, labels `seed=...`) and only `show`
    // and the report treat a `seed` axis as repetition.
    if let Some(v) = m.get("seeds") {
        let path = ["stages", sname, "seeds"];
        match v.as_u64().filter(|n| (1..=MAX_SEEDS).contains(n)) {
            None => cx.err(&path, format!("expected a number of seeds from 1 to {MAX_SEEDS}, found {}", show_yaml(v))),
            Some(n) => match specs.iter().find(|s| s.name == "seed") {
                None => cx.err(
                    &path,
                    format!("stage kind `{kind_name}` has no `seed` param to repeat over; `seeds` fits kinds with one (train, retrain)"),
                ),
                Some(_) if params.contains_key("seed") || refs.iter().any(|r| r.param == "seed") => {
                    cx.err(&path, "`seeds` and a fixed `seed` param both set the seed; keep one")
                }
                Some(_) if grid.iter().chain(&zip).any(|(a, _)| a == "seed") => {
                    cx.err(&path, "`seeds` and a `seed` sweep axis both set the seed; keep one")
                }
                // Seeds are params of type Int (at most i64::MAX): S..S+N-1 must fit, never wrap
                // (wrapping would give two pipeline seeds the same training seeds).
                Some(_) if pipeline_seed.checked_add(n - 1).is_none_or(|last| last > i64::MAX as u64) => cx.err(
                    &path,
                    format!("`seeds: {n}` counts from the pipeline seed {pipeline_seed}, past the largest seed {}; lower the pipeline `seed`", i64::MAX),
                ),
                Some(spec) => {
                    let values: Vec<Json> = (0..n).filter_map(|i| spec.ty.check(&Json::from(pipeline_seed + i)).ok()).collect();
                    grid.push(("seed".to_string(), values));
                }
            },
        }
    }
    for (a, _) in &zip {
        if grid.iter().any(|(g, _)| g == a) {
            cx.err(&["stages", sname, "sweep", "zip", a], format!("axis `{a}` is swept in both `grid` and `zip`"));
        }
    }
    if let Some((first, fv)) = zip.first() {
        for (a, v) in &zip[1..] {
            if v.len() != fv.len() {
                cx.err(
                    &["stages", sname, "sweep", "zip", a],
                    format!("zipped axes must have equal lengths: `{first}` has {}, `{a}` has {}", fv.len(), v.len()),
                );
            }
        }
    }
    if let Some((_, fv)) = zip.first()
        && zip.iter().all(|(_, v)| v.len() == fv.len())
    {
        let rows: Vec<String> =
            (0..fv.len()).map(|r| zip.iter().map(|(a, v)| format!("{a}={}", show_value(&v[r]))).collect::<Vec<_>>().join(", ")).collect();
        if let Some((first, again)) = first_repeat(&rows) {
            cx.err(
                &["stages", sname, "sweep", "zip"],
                format!("row {} ({}) repeats row {}; zipped rows must be distinct", again + 1, rows[again], first + 1),
            );
        }
    }
    // Resources.
    let mut resources = kind.default_resources();
    match m.get("resources") {
        None | Some(Yaml::Null) => {}
        Some(Yaml::Mapping(rm)) => {
            for (rk, rv) in rm {
                let rk = key_str(rk);
                if !RESOURCE_KEYS.contains(&rk.as_str()) {
                    cx.unknown_key(&["stages", sname, "resources"], &rk, RESOURCE_KEYS);
                    continue;
                }
                if rk == "mem" || rk == "time" {
                    let v = executor::size_or_duration(cx, &["stages", sname, "resources", &rk], rv, rk == "time");
                    if rk == "mem" {
                        resources.mem = v;
                    } else {
                        resources.time = v;
                    }
                    continue;
                }
                if rk == "gpu" {
                    // A whole count of devices or a fraction of one (shared; see `GpuShare`).
                    match rv.as_f64().ok_or_else(|| format!("expected a number, found {}", show_yaml(rv))).and_then(|v| {
                        crate::stage_kind::GpuShare::from_f64(v, MAX_RESOURCE_COUNT as u32).map_err(|e| format!("{e}, found {}", show_yaml(rv)))
                    }) {
                        Ok(share) => resources.gpu = share,
                        Err(e) => cx.err(&["stages", sname, "resources", &rk], e),
                    }
                    continue;
                }
                // At least 1: every running instance holds a CPU slot (0 used to mean 1, silently).
                match rv.as_u64() {
                    Some(n) if (1..=MAX_RESOURCE_COUNT).contains(&n) => resources.cpu = n as u32,
                    _ => cx.err(
                        &["stages", sname, "resources", &rk],
                        format!("expected a count of CPU slots from 1 to {MAX_RESOURCE_COUNT}, found {}", show_yaml(rv)),
                    ),
                }
            }
        }
        Some(other) => cx.err(
            &["stages", sname, "resources"],
            format!("expected a map like {{gpu: 1, cpu: 2, mem: 4G, time: 2h}}, found {}", type_name(other)),
        ),
    }
    // Required params: given as param, axis or default.
    for s in &specs {
        let given =
            params.contains_key(s.name) || refs.iter().any(|r| r.param == s.name) || grid.iter().chain(&zip).any(|(a, _)| a == s.name);
        if !given && !s.optional && (s.default)().is_null() {
            cx.err(&["stages", sname, "params"], format!("missing required param `{}` ({})", s.name, s.ty.describe()));
        }
    }
    if cx.errors.iter().any(|e| e.field.starts_with(&format!("stages.{sname}."))) {
        return None;
    }
    Some(StageSpec { name: sname.to_string(), kind: kind_name, params, inputs, grid, zip, resources, refs })
}

#[cfg(test)]
mod seeds_tests {
    use super::*;

    fn parse_str(yaml: &str) -> SpecResult<Pipeline> {
        parse(Path::new("p.yaml"), yaml, &[], &crate::stages::catalog())
    }

    const BASE: &str =
        "name: s\nseed: 42\nstages:\n  d:\n    kind: data\n    params: {source: synthetic}\n  t:\n    kind: train\n    inputs: {data: d}\n";

    #[test]
    fn seeds_become_a_seed_axis_from_the_pipeline_seed() {
        let p = parse_str(&format!("{BASE}    seeds: 3\n    sweep:\n      grid: {{epochs: [1, 2]}}\n")).expect("valid");
        let t = &p.stages["t"];
        assert_eq!(t.grid, vec![("epochs".to_string(), vec![json(1), json(2)]), ("seed".to_string(), vec![json(42), json(43), json(44)])]);
        let order = crate::dag::stage_order(&p.stages);
        let inst = crate::sweep::expand(&p, &order, &crate::stages::catalog());
        let labels: Vec<&str> = inst.iter().filter(|i| i.stage == "t").map(|i| i.label.as_str()).collect();
        assert_eq!(labels.len(), 6);
        assert!(labels.contains(&"t[epochs=2,seed=43]"), "{labels:?}");
        assert!(inst.iter().filter(|i| i.stage == "t").all(|i| i.params["seed"] == i.coords["t.seed"]));
    }

    fn json(n: u64) -> Json {
        Json::from(n)
    }

    #[test]
    fn non_finite_and_too_large_numbers_say_what_they_are() {
        let e = parse_str(&format!("{BASE}    params: {{lr: .nan}}\n")).unwrap_err().to_string();
        assert!(e.contains("stages.t.params.lr: expected a number in") && e.contains("found NaN (`.nan`)"), "{e}");
        let e = parse_str(&format!("{BASE}    sweep: {{grid: {{lr: [0.1, -.inf]}}}}\n")).unwrap_err().to_string();
        assert!(e.contains("value 2: expected a number in") && e.contains("found an infinity (`.inf`)"), "{e}");
        let e = parse_str(&format!("{BASE}    params: {{epochs: 99999999999999999999999999}}\n")).unwrap_err().to_string();
        assert!(e.contains("p.yaml:10:") && e.contains("stages.t.params.epochs: the number 99999999999999999999999999 is too large"), "{e}");
        assert!(!e.contains("u128") && !e.contains("YAML syntax error"), "{e}");
    }

    #[test]
    fn stage_names_that_references_cannot_reach_are_errors() {
        for bad in ["a.b", "", "x y", "t[1]", "a=b"] {
            let yaml = format!("name: s\nstages:\n  d:\n    kind: data\n    params: {{source: synthetic}}\n  {bad:?}:\n    kind: train\n    inputs: {{data: d}}\n");
            let e = parse_str(&yaml).unwrap_err();
            assert!(e.errors.iter().any(|x| x.field == format!("stages.{bad}") && x.message.contains("stage name")), "{bad:?}: {e}");
        }
        for bad in ["a}b", "t\u{7}", "x\ty", "$x", "a,b"] {
            assert!(bad_stage_name(bad).is_some(), "{bad:?}");
        }
        for good in ["train_2", "retrain-vgg", "A1", "données", "训练", "a/b", "x+y"] {
            assert_eq!(bad_stage_name(good), None);
        }
    }

    #[test]
    fn bad_seeds_are_errors_at_the_field() {
        let cases = [
            (format!("{BASE}    seeds: 0\n"), "stages.t.seeds", "expected a number of seeds from 1 to 1000, found `0`"),
            (format!("{BASE}    seeds: many\n"), "stages.t.seeds", "found `many`"),
            (format!("{BASE}    seeds: 2\n    params: {{seed: 5}}\n"), "stages.t.seeds", "`seeds` and a fixed `seed` param"),
            (
                format!("{BASE}    seeds: 2\n    sweep:\n      grid: {{seed: [1, 2]}}\n"),
                "stages.t.seeds",
                "`seeds` and a `seed` sweep axis",
            ),
            (
                BASE.replace("params: {source: synthetic}", "params: {source: synthetic}\n    seeds: 2"),
                "stages.d.seeds",
                "has no `seed` param",
            ),
        ];
        for (yaml, field, msg) in cases {
            let e = parse_str(&yaml).expect_err("invalid");
            let hit = e.errors.iter().find(|x| x.field == field).unwrap_or_else(|| panic!("no error at {field}: {e}"));
            assert!(hit.message.contains(msg), "{}", hit.message);
            assert!(hit.location.is_some(), "{field} has no location");
        }
    }
}

#[cfg(test)]
mod gpu_share_tests {
    use super::*;
    use crate::stage_kind::GpuShare;

    const BASE: &str = "name: s\nstages:\n  d:\n    kind: data\n    params: {source: synthetic}\n  t:\n    kind: train\n    inputs: {data: d}\n";

    fn with_gpu(v: &str) -> SpecResult<Pipeline> {
        parse(Path::new("p.yaml"), &format!("{BASE}    resources: {{gpu: {v}, cpu: 2}}\n"), &[], &crate::stages::catalog())
    }

    #[test]
    fn whole_counts_and_fractions_of_one_gpu_parse_exactly() {
        for (v, thousandths) in [("0", 0), ("1", 1000), ("3", 3000), ("0.25", 250), ("0.5", 500), ("0.333", 333), ("0.001", 1), ("1.0", 1000)] {
            let p = with_gpu(v).unwrap_or_else(|e| panic!("{v}: {e}"));
            assert_eq!(p.stages["t"].resources.gpu, GpuShare::from_thousandths(thousandths), "{v}");
            assert_eq!(p.stages["t"].resources.cpu, 2);
        }
        assert_eq!(GpuShare::from_thousandths(250).to_string(), "0.25");
        assert_eq!(GpuShare::whole(2).to_string(), "2");
        assert!(GpuShare::from_thousandths(999).is_fraction() && !GpuShare::whole(1).is_fraction());
    }

    #[test]
    fn bad_gpu_shares_are_errors_at_the_field_saying_what_is_expected() {
        for (v, msg) in [
            ("1.5", "a share above one GPU must be whole"),
            ("-1", "whole number of GPUs (0 to 1024) or a fraction of one GPU"),
            ("0.0005", "thousandths of a GPU"),
            ("0.1234", "thousandths of a GPU"),
            ("2000", "whole number of GPUs (0 to 1024)"),
            ("half", "expected a number, found `half`"),
            (".nan", "fraction of one GPU"),
        ] {
            let e = with_gpu(v).expect_err(v);
            let hit = e.errors.iter().find(|x| x.field == "stages.t.resources.gpu").unwrap_or_else(|| panic!("{v}: no error at the field: {e}"));
            assert!(hit.message.contains(msg), "{v}: {}", hit.message);
            assert!(hit.location.is_some());
        }
    }
}
