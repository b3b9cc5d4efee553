//! A spec fuzzer: structure-aware mutations of the shipped pipelines (dropped, duplicated,
//! renamed and retyped keys, swapped values, giant grids, deep nesting, alias bombs, invalid
//! UTF-8, several documents, missing data roots, text damage) driven through the library's
//! own loading path in process: `spec::parse_bytes`, `sweep::expand_checked`, the data
//! check, `dag` and `plan` against an empty cache. Nothing is trained.
//!
//! Asserted for every case: no panic (caught, with the case printed), no hang (each case
//! has a time budget, checked from another thread), every spec error names file:line:col,
//! and an accepted spec expands to instances with unique labels and a decision each.
//!
//! CI runs `CAMFLOW_FUZZ_CASES` (default 2,000) cases; on demand:
//!   CAMFLOW_FUZZ_CASES=100000 cargo test --release --locked --test e2e fuzz -- --nocapture
//! A failure prints its seed and case number; `CAMFLOW_FUZZ_SEED=S CAMFLOW_FUZZ_CASE=N`
//! replays that one case.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use camflow::cache::{Lookup, Sidecar};
use camflow::plan::{self, CacheView, KeyContext};
use camflow::spec::{self, SpecErrors};
use camflow::stage_kind::Catalog;
use camflow::{dag, stages, sweep};
use serde_yaml::{Mapping, Value as Yaml};

use crate::support::{Project, TINY};

/// The fuzzer's instance limit: small, so that a case stays in milliseconds; the limit's
/// own behaviour at the default is tested by `giant_grids_are_refused_before_expansion`.
const LIMIT: u64 = 5_000;
/// Per case; a case over it is a hang. Generous, for debug builds on a loaded 2-core machine.
const BUDGET: Duration = Duration::from_secs(10);

/// splitmix64: tiny, seedable, the same on every platform.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 { 0 } else { (self.next() % n as u64) as usize }
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
}

struct Corpus {
    seeds: Vec<String>,
    /// Stage kinds, param names, stage names, choice values: words the mutations reuse.
    words: Vec<String>,
    kinds: Vec<String>,
}

fn corpus(catalog: &Catalog) -> Corpus {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
    let mut seeds: Vec<String> = std::fs::read_dir(&dir)
        .expect("pipelines/")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml") && !p.to_string_lossy().ends_with(".lock.yaml"))
        .map(|p| std::fs::read_to_string(p).expect("pipeline"))
        .collect();
    seeds.sort();
    seeds.push(TINY.to_string());
    assert!(seeds.len() >= 3, "the shipped pipelines are the fuzzer's seeds");
    let kinds: Vec<String> = catalog.names().iter().map(|s| s.to_string()).collect();
    let mut words: BTreeSet<String> = kinds.iter().cloned().collect();
    for k in &kinds {
        if let Some(kind) = catalog.get(k) {
            words.extend(kind.params().iter().map(|p| p.name.to_string()));
            words.extend(kind.inputs().iter().map(|s| s.name.to_string()));
        }
    }
    for w in [
        "name",
        "seed",
        "backend",
        "defaults",
        "stages",
        "kind",
        "params",
        "inputs",
        "sweep",
        "grid",
        "zip",
        "resources",
        "cpu",
        "gpu",
        "data",
        "train",
        "cams",
        "masks",
        "retrain",
        "filtered",
        "vgg",
        "vgg-small",
        "resnet",
        "gradcam",
        "gradcam++",
        "otsu",
        "fixed",
        "synthetic",
        "lgg",
        "folders",
        "manifest",
        "cuda",
        "${train.arch}",
        "${data.count}",
        "${nope.x}",
        "${train}",
        "",
    ] {
        words.insert(w.to_string());
    }
    Corpus { seeds, words: words.into_iter().collect(), kinds }
}

/// A random scalar, list or map, of any type the spec might see.
fn random_value(r: &mut Rng, c: &Corpus, depth: usize) -> Yaml {
    match r.below(if depth > 2 { 9 } else { 11 }) {
        0 => Yaml::Null,
        1 => Yaml::Bool(r.chance(50)),
        2 => Yaml::Number((*r.pick(&[0i64, 1, -1, 2, 7, 16, 32, 1000, 100_000, i64::MAX, i64::MIN])).into()),
        3 => Yaml::Number((*r.pick(&[0.0f64, 0.5, -0.5, 1e-9, 1e308, f64::NAN, f64::INFINITY, 0.1, 2.5])).into()),
        4 => Yaml::Number(((r.next() >> 1) as i64 - (1 << 62)).into()),
        5..=8 => Yaml::String(r.pick(&c.words).clone()),
        9 => Yaml::Sequence((0..r.below(5)).map(|_| random_value(r, c, depth + 1)).collect()),
        _ => {
            let mut m = Mapping::new();
            for _ in 0..r.below(4) {
                m.insert(Yaml::String(r.pick(&c.words).clone()), random_value(r, c, depth + 1));
            }
            Yaml::Mapping(m)
        }
    }
}

/// Paths (as key/index steps) to every node of a tree.
#[derive(Clone, Debug)]
enum Step {
    Key(Yaml),
    Index(usize),
}

fn paths(v: &Yaml, here: &mut Vec<Step>, out: &mut Vec<Vec<Step>>) {
    out.push(here.clone());
    match v {
        Yaml::Mapping(m) => {
            for (k, x) in m {
                here.push(Step::Key(k.clone()));
                paths(x, here, out);
                here.pop();
            }
        }
        Yaml::Sequence(s) => {
            for (i, x) in s.iter().enumerate() {
                here.push(Step::Index(i));
                paths(x, here, out);
                here.pop();
            }
        }
        _ => {}
    }
}

fn node_mut<'a>(v: &'a mut Yaml, path: &[Step]) -> Option<&'a mut Yaml> {
    let mut cur = v;
    for s in path {
        cur = match (s, cur) {
            (Step::Key(k), Yaml::Mapping(m)) => m.get_mut(k)?,
            (Step::Index(i), Yaml::Sequence(q)) => q.get_mut(*i)?,
            _ => return None,
        };
    }
    Some(cur)
}

fn random_path(r: &mut Rng, v: &Yaml) -> Vec<Step> {
    let mut all = Vec::new();
    paths(v, &mut Vec::new(), &mut all);
    r.pick(&all).clone()
}

/// The mapping of stages, if the tree still has one.
fn stages_mut(v: &mut Yaml) -> Option<&mut Mapping> {
    v.as_mapping_mut()?.get_mut("stages")?.as_mapping_mut()
}

fn random_stage<'a>(r: &mut Rng, v: &'a mut Yaml) -> Option<&'a mut Mapping> {
    let st = stages_mut(v)?;
    let n = st.len();
    if n == 0 {
        return None;
    }
    let i = r.below(n);
    st.values_mut().nth(i)?.as_mapping_mut()
}

/// One structure-aware change of the tree.
fn mutate_tree(r: &mut Rng, c: &Corpus, v: &mut Yaml) {
    match r.below(11) {
        // Drop a key.
        0 => {
            let p = random_path(r, v);
            if let Some(Yaml::Mapping(m)) = node_mut(v, &p)
                && !m.is_empty()
            {
                let k = m.keys().nth(r.below(m.len())).cloned();
                if let Some(k) = k {
                    m.remove(&k);
                }
            }
        }
        // Retype a node.
        1 | 2 => {
            let p = random_path(r, v);
            let new = random_value(r, c, 0);
            if let Some(n) = node_mut(v, &p) {
                *n = new;
            }
        }
        // Swap two nodes.
        3 => {
            let (a, b) = (random_path(r, v), random_path(r, v));
            let va = node_mut(v, &a).map(|x| x.clone());
            let vb = node_mut(v, &b).map(|x| x.clone());
            if let (Some(va), Some(vb)) = (va, vb) {
                if let Some(n) = node_mut(v, &a) {
                    *n = vb;
                }
                if let Some(n) = node_mut(v, &b) {
                    *n = va;
                }
            }
        }
        // Rename a key to another known word (or a misspelling of it).
        4 => {
            let p = random_path(r, v);
            let mut word = r.pick(&c.words).clone();
            if r.chance(30) && !word.is_empty() {
                word.remove(r.below(word.len()).min(word.len() - 1));
            }
            if let Some(Yaml::Mapping(m)) = node_mut(v, &p)
                && !m.is_empty()
            {
                let i = r.below(m.len());
                if let Some(k) = m.keys().nth(i).cloned()
                    && let Some(x) = m.remove(&k)
                {
                    m.insert(Yaml::String(word), x);
                }
            }
        }
        // A giant (or merely big) grid on a stage, over its kind's real param names.
        5 => {
            let axes = 1 + r.below(10);
            let values = 1 + r.below(12);
            let words: Vec<String> = c.words.clone();
            if let Some(s) = random_stage(r, v) {
                let mut grid = Mapping::new();
                for a in 0..axes {
                    let name = r.pick(&words).clone();
                    let vals: Vec<Yaml> = (0..values)
                        .map(|i| if a % 3 == 2 { Yaml::String(format!("v{i}")) } else { Yaml::Number(((i + 1) as i64).into()) })
                        .collect();
                    grid.insert(Yaml::String(name), Yaml::Sequence(vals));
                }
                let mut sw = Mapping::new();
                sw.insert("grid".into(), Yaml::Mapping(grid));
                s.insert("sweep".into(), Yaml::Mapping(sw));
            }
        }
        // Repeat a sweep value.
        6 => {
            if let Some(s) = random_stage(r, v)
                && let Some(Yaml::Mapping(sw)) = s.get_mut("sweep")
                && let Some((_, Yaml::Mapping(axes))) = sw.iter_mut().next()
                && let Some((_, Yaml::Sequence(vals))) = axes.iter_mut().next()
                && let Some(x) = vals.first().cloned()
            {
                vals.push(x);
            }
        }
        // A data source whose root or manifest does not exist.
        7 => {
            let missing = format!("does-not-exist-{}", r.below(1000));
            let (source, key) = *r.pick(&[("lgg", "root"), ("folders", "root"), ("manifest", "manifest")]);
            if let Some(st) = stages_mut(v)
                && let Some(Yaml::Mapping(d)) = st.get_mut("data")
            {
                let mut params = Mapping::new();
                params.insert("source".into(), source.into());
                params.insert(key.into(), Yaml::String(if key == "manifest" { format!("{missing}/m.csv") } else { missing }));
                d.insert("params".into(), Yaml::Mapping(params));
            }
        }
        // Deep nesting somewhere.
        8 => {
            let depth = 20 + r.below(300);
            let mut x = random_value(r, c, 3);
            for i in 0..depth {
                x = if i % 2 == 0 { Yaml::Sequence(vec![x]) } else { Yaml::Mapping([(Yaml::String("k".into()), x)].into_iter().collect()) };
            }
            let p = random_path(r, v);
            if let Some(n) = node_mut(v, &p) {
                *n = x;
            }
        }
        // A new stage of a random kind wired to random stages.
        9 => {
            let kind = r.pick(&c.kinds).clone();
            let names: Vec<String> =
                stages_mut(v).map(|m| m.keys().filter_map(|k| k.as_str().map(String::from)).collect()).unwrap_or_default();
            let mut s = Mapping::new();
            s.insert("kind".into(), kind.into());
            let mut inputs = Mapping::new();
            for slot in ["data", "model", "heatmaps", "masks"] {
                if r.chance(40) && !names.is_empty() {
                    inputs.insert(slot.into(), r.pick(&names).clone().into());
                }
            }
            s.insert("inputs".into(), Yaml::Mapping(inputs));
            let name = format!("s{}", r.below(100));
            if let Some(st) = stages_mut(v) {
                st.insert(name.into(), Yaml::Mapping(s));
            }
        }
        // Zip axes of unequal or repeated rows.
        _ => {
            if let Some(s) = random_stage(r, v) {
                let n = 1 + r.below(4);
                let mut zip = Mapping::new();
                zip.insert("method".into(), Yaml::Sequence((0..n).map(|_| Yaml::String(r.pick(&["fixed", "otsu"]).to_string())).collect()));
                zip.insert(
                    "value".into(),
                    Yaml::Sequence((0..n + r.below(2)).map(|i| Yaml::Number((0.1 * (1 + i % 2) as f64).into())).collect()),
                );
                let mut sw = Mapping::new();
                sw.insert("zip".into(), Yaml::Mapping(zip));
                s.insert("sweep".into(), Yaml::Mapping(sw));
            }
        }
    }
}

fn billion_laughs(levels: usize, width: usize) -> String {
    let mut s = format!("a0: &a0 [{}]\n", vec!["lol"; width].join(", "));
    for i in 1..levels {
        s.push_str(&format!("a{i}: &a{i} [{}]\n", vec![format!("*a{}", i - 1); width].join(", ")));
    }
    s
}

/// One change of the text: what no tree mutation can produce.
fn mutate_text(r: &mut Rng, bytes: &mut Vec<u8>) {
    let at = |r: &mut Rng, b: &Vec<u8>| r.below(b.len() + 1);
    match r.below(10) {
        // Invalid UTF-8.
        0 => {
            let i = at(r, bytes);
            let bad: &[u8] = r.pick::<&[u8]>(&[&[0xff][..], &[0xc3][..], &[0xe2, 0x82][..], &[0xed, 0xa0, 0x80][..], &[0xc0, 0xaf][..]]);
            bytes.splice(i..i, bad.iter().copied());
        }
        // A second document.
        1 => {
            let doc: &[u8] = r.pick::<&[u8]>(&[&b"---\nname: other\n"[..], &b"...\n"[..], &b"--- {a: 1}\n"[..], &b"---\n"[..]]);
            if r.chance(50) {
                bytes.extend_from_slice(doc);
            } else {
                let lines: Vec<usize> = (0..bytes.len()).filter(|&i| i == 0 || bytes[i - 1] == b'\n').collect();
                let i = *r.pick(&lines);
                bytes.splice(i..i, doc.iter().copied());
            }
        }
        // An alias bomb, exponential or quadratic, at the top or inside a stage.
        2 => {
            let bomb = if r.chance(50) {
                billion_laughs(3 + r.below(8), 2 + r.below(9))
            } else {
                // Under the node budget (parsed whole) or over it (stopped by the count).
                let n = if r.chance(50) { 10 + r.below(300) } else { 1001 + r.below(500) };
                format!("l: &l [{}]\nm: [{}]\n", vec!["1"; n].join(", "), vec!["*l"; n].join(", "))
            };
            let mut b = bomb.into_bytes();
            b.extend_from_slice(bytes);
            *bytes = b;
        }
        // Delete, duplicate or re-indent a line.
        3..=5 => {
            let text = String::from_utf8_lossy(bytes).into_owned();
            let mut lines: Vec<String> = text.lines().map(String::from).collect();
            if lines.is_empty() {
                return;
            }
            let i = r.below(lines.len());
            match r.below(3) {
                0 => {
                    lines.remove(i);
                }
                1 => {
                    let l = lines[i].clone();
                    lines.insert(i, l);
                }
                _ => {
                    let l = &mut lines[i];
                    if r.chance(50) { l.insert_str(0, "  ") } else { *l = l.trim_start().to_string() }
                }
            }
            *bytes = (lines.join("\n") + "\n").into_bytes();
        }
        // Stray YAML punctuation and control characters.
        6..=8 => {
            let i = at(r, bytes);
            let s: &str = r.pick::<&str>(&[
                ":", "[", "]", "{", "}", "&x ", "*x", "!tag ", "'", "\"", "%", "\t", "\0", "\r", "- ", "? ", "|", ">", "#", "<<: *x\n",
                "\u{feff}", "é",
            ]);
            bytes.splice(i..i, s.bytes());
        }
        // Truncation.
        _ => {
            let i = at(r, bytes);
            bytes.truncate(i);
        }
    }
}

fn make_case(seed: u64, case: u64, c: &Corpus) -> Vec<u8> {
    let mut r = Rng(seed ^ case.wrapping_mul(0xA076_1D64_78BD_642F));
    let text = r.pick(&c.seeds).clone();
    let mut bytes = if r.chance(75) {
        match serde_yaml::from_str::<Yaml>(&text) {
            Ok(mut tree) => {
                for _ in 0..1 + r.below(3) {
                    mutate_tree(&mut r, c, &mut tree);
                }
                serde_yaml::to_string(&tree).unwrap_or(text).into_bytes()
            }
            Err(_) => text.into_bytes(),
        }
    } else {
        text.into_bytes()
    };
    if r.chance(45) {
        for _ in 0..1 + r.below(2) {
            mutate_text(&mut r, &mut bytes);
        }
    }
    bytes
}

struct EmptyCache;

impl CacheView for EmptyCache {
    fn lookup(&self, _key: &str) -> Lookup {
        Lookup::Missing
    }
    fn sidecar(&self, _label: &str) -> Option<Sidecar> {
        None
    }
}

#[derive(Default, Debug)]
struct Tally {
    accepted: u64,
    spec_errors: u64,
    instances: u64,
}

/// Every error names a line and column inside the file (or just past its end).
fn check_errors(e: &SpecErrors, file: &Path, bytes: &[u8]) -> Result<(), String> {
    // Line breaks as YAML counts them: \n, \r\n, a lone \r, NEL, LS and PS.
    let text = String::from_utf8_lossy(bytes);
    let lines = text.replace("\r\n", "\n").chars().filter(|c| matches!(c, '\n' | '\r' | '\u{85}' | '\u{2028}' | '\u{2029}')).count() + 1;
    for err in &e.errors {
        match err.location {
            Some((l, c)) if l >= 1 && c >= 1 && l <= lines + 1 => {}
            other => return Err(format!("spec error without a valid file:line:col ({other:?}): {e}")),
        }
        if err.message.trim().is_empty() {
            return Err(format!("spec error with an empty message: {e}"));
        }
    }
    let shown = e.to_string();
    let head = format!("error: {}:", file.display());
    let located = |l: &str| {
        l.strip_prefix(&head).is_some_and(|rest| {
            let mut it = rest.splitn(3, ':');
            it.next().is_some_and(|x| x.parse::<usize>().is_ok()) && it.next().is_some_and(|x| x.parse::<usize>().is_ok())
        })
    };
    if !shown.lines().next().is_some_and(located) {
        return Err(format!("error text does not start with file:line:col: {shown}"));
    }
    Ok(())
}

/// The library's pipeline-loading path, as `camflow plan` takes it, minus terminal output.
fn run_case(bytes: &[u8], catalog: &Catalog, base: &Path, tally: &mut Tally) -> Result<(), String> {
    let file = base.join("p.yaml");
    let p = match spec::parse_bytes(&file, bytes, &[], catalog) {
        Ok(p) => p,
        Err(e) => {
            tally.spec_errors += 1;
            return check_errors(&e, &file, bytes);
        }
    };
    let order = dag::stage_order(&p.stages);
    if order.len() != p.stages.len() {
        return Err(format!("stage order {order:?} misses stages of {:?}", p.stages.keys().collect::<Vec<_>>()));
    }
    let instances = match sweep::expand_checked(&p, &order, catalog, LIMIT) {
        Ok(i) => i,
        Err(e) => {
            tally.spec_errors += 1;
            return check_errors(&e, &file, bytes);
        }
    };
    let counted: u64 = sweep::counts(&p, &order).values().map(|c| c.unwrap_or(u64::MAX)).sum();
    if counted != instances.len() as u64 {
        return Err(format!("counted {counted} instances before expanding, expanded {}", instances.len()));
    }
    // The data check `prepare` does before digesting: a missing root is a spec error.
    for inst in &instances {
        let kind = catalog.get(&inst.kind).ok_or("an instance of an unknown kind")?;
        if let Err(e) = kind.external_files(&inst.params, &p.base_dir) {
            tally.spec_errors += 1;
            return check_errors(&spec::data_error(&p, &inst.stage, &e.to_string()), &file, bytes);
        }
    }
    let labels: BTreeSet<&str> = instances.iter().map(|i| i.label.as_str()).collect();
    if labels.len() != instances.len() {
        return Err(format!("{} instances but {} distinct labels", instances.len(), labels.len()));
    }
    let g = dag::instance_graph(&instances);
    if g.node_count() != instances.len() {
        return Err("instance graph lost nodes".into());
    }
    let _ = (dag::to_dot(&instances), dag::to_mermaid(&instances));
    let files = vec![Default::default(); instances.len()];
    let kcx = KeyContext { catalog, seed: p.seed, backend_class: "fuzz".into(), files: &files };
    let decisions = plan::plan(&instances, &kcx, &EmptyCache, &|_| false);
    if decisions.len() != instances.len() {
        return Err("a decision per instance".into());
    }
    tally.accepted += 1;
    tally.instances += instances.len() as u64;
    Ok(())
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| v.trim().parse().unwrap_or_else(|_| panic!("{name}={v}: expected a number")))
}

fn show_case(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(bytes);
    if s.chars().count() > 3000 {
        format!("{}\n[... {} bytes in all]", s.chars().take(3000).collect::<String>(), bytes.len())
    } else {
        s.into_owned()
    }
}

#[test]
fn fuzz_specs_no_panic_no_hang_errors_located() {
    let seed = env_u64("CAMFLOW_FUZZ_SEED").unwrap_or(0x5EED_CA4F);
    let cases = env_u64("CAMFLOW_FUZZ_CASES").unwrap_or(2_000);
    let only = env_u64("CAMFLOW_FUZZ_CASE");
    let catalog = stages::catalog();
    let c = corpus(&catalog);
    let base = tempfile::tempdir().expect("temp dir");
    let base_path: PathBuf = base.path().to_path_buf();
    let (to_worker, jobs) = mpsc::channel::<(u64, Vec<u8>)>();
    let (to_main, results) = mpsc::channel::<(u64, Result<(), String>, Tally)>();
    // The cases run on a worker so that a hang is seen (and reported) by this thread.
    let worker = std::thread::spawn(move || {
        let catalog = stages::catalog();
        for (case, bytes) in jobs {
            let mut tally = Tally::default();
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_case(&bytes, &catalog, &base_path, &mut tally)));
            let out = match out {
                Ok(r) => r,
                Err(p) => Err(format!(
                    "PANIC: {}",
                    p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default()
                )),
            };
            if to_main.send((case, out, tally)).is_err() {
                return;
            }
        }
    });
    let started = Instant::now();
    let mut total = Tally::default();
    let mut failures: Vec<String> = Vec::new();
    let mut slowest = (Duration::ZERO, 0);
    let range: Vec<u64> = match only {
        Some(n) => vec![n],
        None => (0..cases).collect(),
    };
    for &case in &range {
        let bytes = make_case(seed, case, &c);
        let t = Instant::now();
        to_worker.send((case, bytes.clone())).expect("worker alive");
        match results.recv_timeout(BUDGET) {
            Ok((_, out, tally)) => {
                total.accepted += tally.accepted;
                total.spec_errors += tally.spec_errors;
                total.instances += tally.instances;
                if let Err(m) = out {
                    failures.push(format!("CAMFLOW_FUZZ_SEED={seed} CAMFLOW_FUZZ_CASE={case}: {m}\n--- case ---\n{}", show_case(&bytes)));
                }
            }
            Err(_) => {
                panic!("HANG: CAMFLOW_FUZZ_SEED={seed} CAMFLOW_FUZZ_CASE={case} ran over {BUDGET:?}\n--- case ---\n{}", show_case(&bytes));
            }
        }
        slowest = slowest.max((t.elapsed(), case));
        if std::env::var_os("CAMFLOW_FUZZ_VERBOSE").is_some() && t.elapsed() > Duration::from_millis(200) {
            eprintln!("slow case {case}: {:?}", t.elapsed());
        }
        if failures.len() >= 5 {
            break;
        }
    }
    drop(to_worker);
    let _ = worker.join();
    eprintln!(
        "fuzz: seed {seed:#x}, {} cases in {:.1}s: {} accepted ({} instances), {} spec errors, {} failures; slowest case {} ({:?})",
        range.len(),
        started.elapsed().as_secs_f64(),
        total.accepted,
        total.instances,
        total.spec_errors,
        failures.len(),
        slowest.1,
        slowest.0
    );
    assert!(failures.is_empty(), "{} failing case(s):\n{}", failures.len(), failures.join("\n\n"));
    // The corpus must exercise both sides, or the fuzzer tests nothing.
    if only.is_none() && cases >= 500 {
        assert!(total.accepted > cases / 20 && total.spec_errors > cases / 4, "{total:?}");
    }
}

// ---- The bad inputs of issue 8, through the real binary: exit 2 and file:line:col. ----

const HEAD: &str = "name: bad\nstages:\n  data:\n    kind: data\n    params: {source: synthetic, count: 16, image_size: 16}\n";

fn plan_err(p: &Project, extra: &[&str]) -> String {
    let pl = p.pipeline();
    let mut a = vec!["plan", pl.to_str().expect("utf-8")];
    a.extend(extra);
    let r = p.camflow(&a);
    assert_eq!(r.code(), 2, "stdout:\n{}\nstderr:\n{}", r.stdout(), r.stderr());
    r.stderr().replace(pl.to_str().expect("utf-8"), "p.yaml").trim_end().to_string()
}

#[test]
fn repeated_sweep_values_and_zip_rows_are_errors() {
    let p = Project::new(&format!(
        "{HEAD}  t:\n    kind: train\n    inputs: {{data: data}}\n    sweep:\n      grid:\n        epochs: [1, 2, 1]\n"
    ));
    assert_eq!(
        plan_err(&p, &[]),
        "error: p.yaml:11:9: stages.t.sweep.grid.epochs: value 3 (`1`) repeats value 1; sweep values must be distinct"
    );
    // Zipped axes may repeat values; a repeated row is the error.
    p.write(&format!(
        "{HEAD}  t:\n    kind: train\n    inputs: {{data: data}}\n  c:\n    kind: gradcam\n    inputs: {{model: t, data: data}}\n  m:\n    kind: threshold\n    inputs: {{heatmaps: c}}\n    sweep:\n      zip:\n        method: [fixed, fixed, otsu, fixed]\n        value: [0.1, 0.2, 0.5, 0.1]\n"
    ));
    assert_eq!(
        plan_err(&p, &[]),
        "error: p.yaml:16:7: stages.m.sweep.zip: row 4 (method=fixed, value=0.1) repeats row 1; zipped rows must be distinct"
    );
}

/// A grid with `sizes[i]` values on axis i: train's numeric params, then gradcam's. Values
/// are distinct and each valid on its own, so only the size can be wrong.
fn giant(sizes: &[usize]) -> String {
    type Axis = (&'static str, fn(usize) -> String);
    let train: [Axis; 6] = [
        ("lr", |i| format!("{}", i as f64 * 0.001)),
        ("weight_decay", |i| format!("{}", i as f64 * 0.0001)),
        ("momentum", |i| format!("{}", i as f64 * 0.0005)),
        ("epochs", |i| i.to_string()),
        ("batch_size", |i| i.to_string()),
        ("seed", |i| i.to_string()),
    ];
    let cams: [Axis; 3] = [("layer", |i| i.to_string()), ("batch_size", |i| i.to_string()), ("target", |i| format!("c{i}"))];
    let axis = |(a, f): &Axis, n: usize| format!("        {a}: [{}]\n", (1..=n).map(f).collect::<Vec<_>>().join(", "));
    let mut s = format!("{HEAD}  t:\n    kind: train\n    inputs: {{data: data}}\n    sweep:\n      grid:\n");
    for (a, n) in train.iter().zip(sizes) {
        s.push_str(&axis(a, *n));
    }
    if sizes.len() > train.len() {
        s.push_str("  c:\n    kind: gradcam\n    inputs: {model: t, data: data}\n    sweep:\n      grid:\n");
        for (a, n) in cams.iter().zip(&sizes[train.len()..]) {
            s.push_str(&axis(a, *n));
        }
    }
    s
}

#[test]
fn giant_grids_are_refused_before_expansion() {
    // 10 axes x 10 values: 10^10 instances. Refused at once, pointing at the biggest sweep.
    let mut yaml = giant(&[10; 9]);
    yaml.push_str("  m:\n    kind: threshold\n    inputs: {heatmaps: c}\n    sweep:\n      grid:\n        value: [0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1]\n");
    let p = Project::new(&yaml);
    let t = Instant::now();
    let e = plan_err(&p, &[]);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(
        e.starts_with("error: p.yaml:9:5: stages.t.sweep: the sweeps expand to 11,001,000,001 instances (stage `m`: 10,000,000,000), above the limit of 1,000,000; this sweep gives 1,000,000 points (lr: 10 x weight_decay: 10 x momentum: 10 x epochs: 10 x batch_size: 10 x seed: 10)"),
        "{e}"
    );
    assert!(e.contains("--max-instances or CAMFLOW_MAX_INSTANCES"), "{e}");
    // Overflow of u64 is caught, not wrapped: 1000^7 instances.
    let p = Project::new(&giant(&[1000; 7]));
    let e = plan_err(&p, &[]);
    assert!(e.contains("expand to more than 18,446,744,073,709,551,615 instances"), "{e}");
    // The limit is a setting: 2 x 3 = 6 trainings (+ data) pass 7 and fail 6.
    let p = Project::new(&giant(&[2, 3]));
    let pl = p.pipeline();
    let pl = pl.to_str().expect("utf-8");
    p.camflow(&["plan", pl, "--max-instances", "7"]).ok();
    let e = plan_err(&p, &["--max-instances", "6"]);
    assert!(e.contains("expand to 7 instances (stage `t`: 6), above the limit of 6"), "{e}");
    p.camflow(&["plan", pl]).ok();
    let (code, stderr) = with_env(&p, &["plan", pl], "CAMFLOW_MAX_INSTANCES", "5");
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("above the limit of 5"), "{stderr}");
}

/// A camflow command with one environment variable set: (exit code, stderr).
fn with_env(p: &Project, args: &[&str], k: &str, v: &str) -> (i32, String) {
    let cache = p.cache();
    let out = p.cmd(args).args(["--cache-dir", cache.to_str().expect("utf-8")]).env(k, v).output().expect("runs");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn invalid_utf8_multi_document_and_alias_bombs_are_located() {
    let p = Project::new("");
    std::fs::write(p.pipeline(), b"name: bad\nstages:\n  d\xc3\x28ta:\n").expect("write");
    assert_eq!(plan_err(&p, &[]), "error: p.yaml:3:4: the file is not valid UTF-8 (byte 0xc3); save it as UTF-8 text");
    p.write(&format!("{HEAD}---\n{HEAD}"));
    assert_eq!(
        plan_err(&p, &[]),
        "error: p.yaml:6:1: a pipeline file holds one YAML document, but a second one starts here; remove the `---` or split the file"
    );
    let mut bomb = String::from("a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for i in 1..10 {
        bomb.push_str(&format!("a{i}: &a{i} [{}]\n", vec![format!("*a{}", i - 1); 10].join(", ")));
    }
    p.write(&format!("{bomb}{HEAD}"));
    let t = Instant::now();
    // serde_yaml's jump limit stops the exponential bomb; the first alias is the place.
    assert_eq!(
        plan_err(&p, &[]),
        "error: p.yaml:2:10: YAML aliases expand to too many repetitions (an alias bomb?); write the values out or use fewer aliases"
    );
    // A quadratic one stays within that limit: the node budget stops it, where it ran out.
    let n = 3000;
    p.write(&format!("l: &l [{}]\nm: [{}]\n{HEAD}", vec!["1"; n].join(", "), vec!["*l"; n].join(", ")));
    let e = plan_err(&p, &[]);
    assert!(e.starts_with("error: p.yaml:1:") && e.contains("more than 1000000 YAML nodes") && e.contains("alias bomb"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // A document that is not a map, or misses `stages`, points at its first line of content.
    p.write("# a comment\n- a\n- b\n");
    assert_eq!(plan_err(&p, &[]), "error: p.yaml:2:1: a pipeline must be a map with `name` and `stages`, found a list");
}

#[test]
fn missing_data_root_is_a_located_spec_error() {
    let p = Project::new("name: bad\nstages:\n  data:\n    kind: data\n    params:\n      source: lgg\n      root: no/such/folder\n");
    let e = plan_err(&p, &[]);
    assert!(e.starts_with("error: p.yaml:7:7: stages.data.params.root: stage `data` cannot read its data: "), "{e}");
    assert!(e.contains("no/such/folder"), "{e}");
}

#[test]
fn gpu_stage_with_no_gpu_fails_before_running_anything() {
    let yaml = crate::support::TINY.replace(
        "    params: {epochs: 1, batch_size: 16}\n  cams:",
        "    params: {epochs: 1, batch_size: 16}\n    resources: {gpu: 1}\n  cams:",
    );
    assert_ne!(yaml, crate::support::TINY);
    let p = Project::new(&yaml);
    let r = p.run(&["--gpus", "0"]);
    assert_eq!(r.code(), 2, "stdout:\n{}\nstderr:\n{}", r.stdout(), r.stderr());
    assert!(r.stderr().contains("--gpus 0, but stage(s) `train` ask for a GPU"), "{}", r.stderr());
    // Nothing ran: not even the data stage, which needs no GPU.
    assert!(!p.cache().join("actions").exists() || std::fs::read_dir(p.cache().join("actions")).expect("dir").count() == 0);
    assert!(!p.path().join("p.lock.yaml").exists());
}

// ---- Review of issue 8: limits, a BOM and the CPU kernel setting. ----

#[test]
fn an_instance_limit_beyond_memory_is_a_usage_error_not_an_abort() {
    // 10^10 instances: with the limit raised to u64::MAX, planning reserved 80 GB and aborted.
    let mut yaml = giant(&[10; 9]);
    yaml.push_str("  m:\n    kind: threshold\n    inputs: {heatmaps: c}\n    sweep:\n      grid:\n        value: [0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1]\n");
    let p = Project::new(&yaml);
    let pl = p.pipeline();
    let pl = pl.to_str().expect("utf-8");
    let (code, stderr) = with_env(&p, &["plan", pl], "CAMFLOW_MAX_INSTANCES", "18446744073709551615");
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("CAMFLOW_MAX_INSTANCES=18446744073709551615: at most 100000000 instances can be planned"), "{stderr}");
    let e = plan_err(&p, &["--max-instances", "100000001"]);
    assert!(e.contains("--max-instances 100000001: at most 100000000"), "{e}");
    // The highest settable limit still refuses this grid cleanly (a spec error, exit 2).
    let e = plan_err(&p, &["--max-instances", "100000000"]);
    assert!(e.contains("above the limit of 100,000,000"), "{e}");
}

#[test]
fn a_leading_byte_order_mark_is_accepted_and_locations_stay_right() {
    let p = Project::new("");
    let pl = p.pipeline();
    std::fs::write(&pl, format!("\u{feff}{TINY}")).expect("write");
    p.camflow(&["plan", pl.to_str().expect("utf-8")]).ok();
    // An error keeps the line and column it has without the mark.
    // On line 1, where the mark is, and below it.
    let bad = HEAD.replace("name: bad", "name: [bad]");
    p.write(&bad);
    let plain = plan_err(&p, &[]);
    std::fs::write(&pl, format!("\u{feff}{bad}")).expect("write");
    assert_eq!(plan_err(&p, &[]), plain);
    assert!(plain.starts_with("error: p.yaml:1:1: name: "), "{plain}");
    let bad = HEAD.replace("count: 16", "count: many");
    p.write(&bad);
    let plain = plan_err(&p, &[]);
    std::fs::write(&pl, format!("\u{feff}{bad}")).expect("write");
    assert_eq!(plan_err(&p, &[]), plain);
    assert!(plain.starts_with("error: p.yaml:5:"), "{plain}");
}

#[test]
fn a_bad_cpu_kernel_setting_is_a_usage_error_before_anything_runs() {
    let p = Project::new(TINY);
    let pl = p.pipeline();
    let pl = pl.to_str().expect("utf-8");
    let mut bad = vec!["bogus", "AVX2", "avx512f"];
    #[cfg(target_arch = "x86_64")]
    if !std::arch::is_x86_feature_detected!("avx512f") {
        bad.push("avx512"); // a level this CPU lacks
    }
    for v in bad {
        for args in [vec!["plan", pl], vec!["run", pl, "--dry-run"], vec!["run", pl]] {
            let (code, stderr) = with_env(&p, &args, "CAMFLOW_CPU_KERNELS", v);
            assert_eq!(code, 2, "{v} {args:?}: {stderr}");
            assert!(stderr.contains(&format!("CAMFLOW_CPU_KERNELS={v}")), "{stderr}");
            assert!(stderr.contains("auto, baseline, avx2, avx512"), "{stderr}");
        }
    }
    // Nothing ran, not even the data stage.
    let actions = p.cache().join("actions");
    assert!(!actions.exists() || std::fs::read_dir(&actions).expect("dir").count() == 0);
    let (code, stderr) = with_env(&p, &["plan", pl], "CAMFLOW_CPU_KERNELS", "baseline");
    assert_eq!(code, 0, "{stderr}");
}
