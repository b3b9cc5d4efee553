//! Sweep expansion: stages x axes -> concrete stage instances. Pure: no fs, env or clock.
//!
//! Each stage contributes its own points (the cartesian product of its `grid` axes, times the
//! rows of its `zip` axes). A stage gets one instance per combination of upstream instances
//! that agree on every axis they share, times its own points. Axes are identified by
//! `stage.param`, so two stages may sweep params of the same name without clashing; instance
//! labels use the short param name unless that would be ambiguous.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde_json::Value as Json;

use crate::spec::{Pipeline, SpecError, SpecErrors, SpecResult, StageSpec, locate_or_nearest};
use crate::stage_kind::{Catalog, Params};

/// One concrete unit of work.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    pub stage: String,
    pub kind: String,
    /// `stage[axis=value,...]`, unique within a pipeline.
    pub label: String,
    /// Axis id (`stage.param`) -> value, for this instance and everything upstream.
    pub coords: BTreeMap<String, Json>,
    /// Fully resolved params: kind defaults < pipeline defaults < inherited from upstream
    /// ([`crate::stage_kind::StageKind::inherits`]) < stage params < own axes.
    /// Shared: every instance of a stage at one sweep point has the same params (upstream
    /// axes are not params), so 100,000 instances hold a few hundred maps, not 100,000.
    pub params: Arc<Params>,
    /// Input slot -> index of the upstream instance.
    pub inputs: BTreeMap<String, usize>,
}

/// Renders a value for a label: strings bare, numbers as JSON.
pub fn show_value(v: &Json) -> String {
    match v {
        Json::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Capacity to reserve for `n` items: a hint, never more than 65,536 up front, so a count
/// beyond what memory holds grows (and can be refused) rather than aborting in one allocation.
fn reserve(n: usize) -> usize {
    n.min(1 << 16)
}

fn own_points(s: &StageSpec) -> Vec<BTreeMap<String, Json>> {
    let mut points = vec![BTreeMap::new()];
    for (axis, values) in &s.grid {
        let mut next = Vec::with_capacity(reserve(points.len().saturating_mul(values.len())));
        for p in &points {
            for v in values {
                let mut q = p.clone();
                q.insert(axis.clone(), v.clone());
                next.push(q);
            }
        }
        points = next;
    }
    if let Some((_, first)) = s.zip.first() {
        let mut next = Vec::with_capacity(reserve(points.len().saturating_mul(first.len())));
        for p in &points {
            for row in 0..first.len() {
                let mut q = p.clone();
                for (axis, values) in &s.zip {
                    q.insert(axis.clone(), values[row].clone());
                }
                next.push(q);
            }
        }
        points = next;
    }
    points
}

fn agree(a: &BTreeMap<String, Json>, b: &BTreeMap<String, Json>) -> bool {
    a.iter().all(|(k, v)| b.get(k).is_none_or(|w| w == v))
}

/// The upstream instances that may agree with a combination, found by the values of the
/// axes both sides have instead of by testing every pair: joining two wide stages (thousands
/// of instances each) was quadratic. Every instance of a stage, and every combination built
/// for one input slot, has the same axes; when that does not hold, every instance is a
/// candidate. Candidates are still tested with [`agree`] (a bucket may hold more: see
/// [`Join::bucket`]), so the result and its order are those of the pairwise test.
struct Join {
    /// Axes shared by the combinations and the upstream instances, and the upstream
    /// positions (in `ups` order) by their values on them; `None`: test every pair.
    index: Option<(Vec<String>, HashMap<String, Vec<usize>>)>,
}

impl Join {
    fn new(out: &[Instance], ups: &[usize], combos: &[(BTreeMap<String, Json>, BTreeMap<String, usize>)]) -> Join {
        let same_axes = |mut maps: Box<dyn Iterator<Item = &BTreeMap<String, Json>> + '_>| -> Option<Vec<String>> {
            let first: Vec<String> = maps.next()?.keys().cloned().collect();
            maps.all(|m| m.len() == first.len() && m.keys().zip(&first).all(|(a, b)| a == b)).then_some(first)
        };
        let up_axes = same_axes(Box::new(ups.iter().map(|&u| &out[u].coords)));
        let combo_axes = same_axes(Box::new(combos.iter().map(|(c, _)| c)));
        let (Some(up_axes), Some(combo_axes)) = (up_axes, combo_axes) else { return Join { index: None } };
        let shared: Vec<String> = combo_axes.into_iter().filter(|a| up_axes.contains(a)).collect();
        let mut index: HashMap<String, Vec<usize>> = HashMap::new();
        for &u in ups {
            index.entry(Join::bucket(&shared, &out[u].coords)).or_default().push(u);
        }
        Join { index: Some((shared, index)) }
    }

    /// The values of `axes` in `coords`, as text. Equal values give equal text (`-0.0` is
    /// written as `0.0`, which equals it); unequal ones may share a bucket, which [`agree`]
    /// then tells apart.
    fn bucket(axes: &[String], coords: &BTreeMap<String, Json>) -> String {
        let vals: Vec<Option<&Json>> = axes.iter().map(|a| coords.get(a)).collect();
        serde_json::to_string(&vals).unwrap_or_default().replace("-0.0", "0.0")
    }

    fn candidates<'a>(&'a self, coords: &BTreeMap<String, Json>, ups: &'a [usize]) -> &'a [usize] {
        match &self.index {
            None => ups,
            Some((shared, index)) => index.get(&Join::bucket(shared, coords)).map(Vec::as_slice).unwrap_or(&[]),
        }
    }
}

/// `stage[axis=value,...]`, axes in pipeline order (upstream stages first).
fn label(stage: &str, coords: &BTreeMap<String, Json>, rank: &BTreeMap<&str, usize>) -> String {
    if coords.is_empty() {
        return stage.to_string();
    }
    let short = |id: &str| id.split_once('.').map(|(_, p)| p.to_string()).unwrap_or_else(|| id.to_string());
    let mut ordered: Vec<(&String, &Json)> = coords.iter().collect();
    ordered.sort_by_key(|(id, _)| id.split_once('.').and_then(|(s, _)| rank.get(s).copied()).unwrap_or(usize::MAX));
    let parts: Vec<String> = ordered
        .into_iter()
        .map(|(id, v)| {
            let s = short(id);
            let ambiguous = coords.keys().filter(|k| short(k) == s).count() > 1;
            format!("{}={}", if ambiguous { id.clone() } else { s }, show_value(v))
        })
        .collect();
    format!("{stage}[{}]", parts.join(","))
}

/// The first instance matching `wanted` upstream of an instance with these `inputs`.
pub fn find_upstream(out: &[Instance], inputs: &BTreeMap<String, usize>, wanted: impl Fn(&Instance) -> bool) -> Option<usize> {
    let mut todo: Vec<usize> = inputs.values().copied().collect();
    while let Some(u) = todo.pop() {
        if wanted(&out[u]) {
            return Some(u);
        }
        todo.extend(out[u].inputs.values().copied());
    }
    None
}

/// The nearest instance matching `wanted` upstream of an instance with these `inputs`
/// (breadth first, inputs in slot order), so an instance inherits from the closest ancestor.
pub fn nearest_upstream(out: &[Instance], inputs: &BTreeMap<String, usize>, wanted: impl Fn(&Instance) -> bool) -> Option<usize> {
    let mut todo: std::collections::VecDeque<usize> = inputs.values().copied().collect();
    let mut seen = std::collections::BTreeSet::new();
    while let Some(u) = todo.pop_front() {
        if !seen.insert(u) {
            continue;
        }
        if wanted(&out[u]) {
            return Some(u);
        }
        todo.extend(out[u].inputs.values().copied());
    }
    None
}

/// An inherited param ([`crate::stage_kind::StageKind::inherits`]) whose value was
/// overridden, so the instance differs from the one it is compared with.
#[derive(Debug, Clone, PartialEq)]
pub struct Mismatch {
    pub param: String,
    /// This instance's value.
    pub value: Json,
    /// The value of the instance it inherits from.
    pub upstream: Json,
    /// That instance's label.
    pub upstream_label: String,
}

/// The inherited params on which instance `i` differs from the instance it inherits from:
/// what remains after explicit overrides, for `show` and the report to flag.
pub fn inherit_mismatches(instances: &[Instance], i: usize, catalog: &Catalog) -> Vec<Mismatch> {
    let Some(kind) = catalog.get(&instances[i].kind) else { return Vec::new() };
    let Some(inh) = kind.inherits() else { return Vec::new() };
    let Some(u) = nearest_upstream(instances, &instances[i].inputs, |x| x.kind == inh.from_kind) else { return Vec::new() };
    let (mine, theirs) = (&instances[i].params, &instances[u].params);
    // Compared as keyed: a param the architecture ignores (a vgg-small's `widths`) is no
    // difference between the two classifiers.
    let (keyed_mine, keyed_theirs) = (kind.key_params(mine), kind.key_params(theirs));
    inh.params
        .iter()
        .filter_map(|p| {
            let (a, b) = (mine.get(*p)?, theirs.get(*p)?);
            let differs = match (keyed_mine.get(*p), keyed_theirs.get(*p)) {
                (Some(x), Some(y)) => x != y,
                _ => a != b,
            };
            differs.then(|| Mismatch {
                param: p.to_string(),
                value: a.clone(),
                upstream: b.clone(),
                upstream_label: instances[u].label.clone(),
            })
        })
        .collect()
}

/// One line for a table cell: `batch_norm=false (train[arch=vgg]: true); lr=0.01 (...: 0.001)`.
pub fn describe_mismatches(m: &[Mismatch]) -> String {
    m.iter()
        .map(|x| format!("{}={} ({}: {})", x.param, show_value(&x.value), x.upstream_label, show_value(&x.upstream)))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Most instances a pipeline may expand to unless told otherwise (`--max-instances`,
/// `CAMFLOW_MAX_INSTANCES`). Planning costs about 2 KB and 5 µs per instance, so this
/// stays within a couple of GB and seconds; anything bigger is almost always a mistake.
pub const DEFAULT_MAX_INSTANCES: u64 = 1_000_000;

/// Points of a stage's own sweep: product of its grid axes times its zip rows. `None` on
/// overflow.
fn own_count(s: &StageSpec) -> Option<u64> {
    let zip = s.zip.first().map_or(1, |(_, v)| v.len() as u64);
    s.grid.iter().try_fold(zip, |n, (_, v)| n.checked_mul(v.len() as u64))
}

/// Instances per stage, computed from the spec alone (nothing is expanded): an instance of a
/// stage is one choice of a point of its own sweep and of each upstream stage's, since
/// upstream instances pair exactly when they agree on the points of the stages they share.
/// `None` where the count overflows u64.
pub fn counts(p: &Pipeline, order: &[String]) -> BTreeMap<String, Option<u64>> {
    let mut out = BTreeMap::new();
    for sname in order {
        let Some(s) = p.stages.get(sname) else { continue };
        let mut factors: Vec<&str> = vec![sname.as_str()];
        let mut todo: Vec<&str> = s.inputs.values().map(|u| u.as_str()).collect();
        while let Some(u) = todo.pop() {
            if factors.contains(&u) {
                continue;
            }
            factors.push(u);
            if let Some(us) = p.stages.get(u) {
                todo.extend(us.inputs.values().map(|x| x.as_str()));
            }
        }
        let n = factors.iter().try_fold(1u64, |n, f| p.stages.get(*f).and_then(own_count).and_then(|c| n.checked_mul(c)));
        out.insert(sname.clone(), n);
    }
    out
}

/// Refuses, before anything is allocated, a pipeline whose sweeps expand to more than `max`
/// instances, pointing at the biggest sweep feeding the biggest stage.
pub fn check_count(p: &Pipeline, order: &[String], max: u64) -> SpecResult<u64> {
    let counts = counts(p, order);
    let total = counts.values().try_fold(0u64, |t, c| c.and_then(|c| t.checked_add(c)));
    if let Some(t) = total
        && t <= max
    {
        return Ok(t);
    }
    let show = |n: Option<u64>| n.map_or_else(|| "more than 18,446,744,073,709,551,615".to_string(), thousands);
    // The biggest stage (an overflow counts as the biggest), then the biggest own sweep among
    // it and its upstream stages: that grid is what to shrink.
    let (worst, wn) = counts.iter().max_by_key(|(_, c)| c.map_or(u128::MAX, u128::from)).map(|(s, c)| (s.clone(), *c)).unwrap_or_default();
    let mut feeding = vec![worst.clone()];
    let mut i = 0;
    while i < feeding.len() {
        if let Some(s) = p.stages.get(&feeding[i]) {
            for u in s.inputs.values() {
                if !feeding.contains(u) {
                    feeding.push(u.clone());
                }
            }
        }
        i += 1;
    }
    let grid = feeding
        .iter()
        .filter_map(|f| p.stages.get(f))
        .max_by_key(|s| own_count(s).map_or(u128::MAX, u128::from))
        .map(|s| s.name.clone())
        .unwrap_or_else(|| worst.clone());
    let gs = &p.stages[&grid];
    let mut shape: Vec<String> = gs.grid.iter().map(|(a, v)| format!("{a}: {}", v.len())).collect();
    if let Some((a, v)) = gs.zip.first() {
        shape.push(format!("zip {a}...: {}", v.len()));
    }
    let field = if gs.grid.is_empty() && gs.zip.is_empty() { vec!["stages", &grid] } else { vec!["stages", &grid, "sweep"] };
    Err(SpecErrors {
        file: p.file.clone(),
        errors: vec![SpecError {
            field: field.join("."),
            location: Some(locate_or_nearest(&p.source, &field)),
            message: format!(
                "the sweeps expand to {} instances (stage `{worst}`: {}), above the limit of {}; this sweep gives {} points ({}). \
                 Sweep fewer values, or raise the limit with --max-instances or CAMFLOW_MAX_INSTANCES",
                show(total),
                show(wn),
                thousands(max),
                show(own_count(gs)),
                shape.join(" x ")
            ),
        }],
    })
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Param `name` of the nearest instance upstream of `i` that has it (breadth first, inputs in
/// slot order).
pub fn upstream_param(instances: &[Instance], i: usize, name: &str) -> Option<Json> {
    let mut level: Vec<usize> = instances[i].inputs.values().copied().collect();
    let mut seen = std::collections::BTreeSet::new();
    while !level.is_empty() {
        let mut next = Vec::new();
        for u in level {
            if !seen.insert(u) {
                continue;
            }
            if let Some(v) = instances[u].params.get(name) {
                return Some(v.clone());
            }
            next.extend(instances[u].inputs.values().copied());
        }
        level = next;
    }
    None
}

/// [`check_count`], [`expand`], then each kind's cross-param checks on every instance (one
/// error per stage and message): what every command that reads a pipeline does.
pub fn expand_checked(p: &Pipeline, order: &[String], catalog: &Catalog, max_instances: u64) -> SpecResult<Vec<Instance>> {
    check_count(p, order, max_instances)?;
    let instances = expand(p, order, catalog);
    let mut errors: Vec<SpecError> = Vec::new();
    for (i, inst) in instances.iter().enumerate() {
        let Some(kind) = catalog.get(&inst.kind) else { continue };
        for (param, msg) in kind.check(&inst.params, &|name| upstream_param(&instances, i, name)) {
            let field = format!("stages.{}.params.{param}", inst.stage);
            if !errors.iter().any(|e| e.field == field && e.message == msg) {
                let location = Some(locate_or_nearest(&p.source, &["stages", &inst.stage, "params", &param]));
                errors.push(SpecError { field, location, message: msg });
            }
        }
    }
    if !errors.is_empty() {
        return Err(SpecErrors { file: p.file.clone(), errors });
    }
    Ok(instances)
}

/// Expands every stage in `order` (a topological order of stage names).
pub fn expand(p: &Pipeline, order: &[String], catalog: &Catalog) -> Vec<Instance> {
    let rank: BTreeMap<&str, usize> = order.iter().enumerate().map(|(i, s)| (s.as_str(), i)).collect();
    let mut out: Vec<Instance> = Vec::new();
    let mut by_stage: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for sname in order {
        let s = &p.stages[sname];
        let Some(kind) = catalog.get(&s.kind) else { continue };
        // Combinations of upstream instances that agree on shared axes.
        let mut combos: Vec<(BTreeMap<String, Json>, BTreeMap<String, usize>)> = vec![(BTreeMap::new(), BTreeMap::new())];
        for (slot, up) in &s.inputs {
            let ups = by_stage.get(up.as_str()).cloned().unwrap_or_default();
            let join = Join::new(&out, &ups, &combos);
            let mut next = Vec::new();
            for (coords, inputs) in &combos {
                for &u in join.candidates(coords, &ups) {
                    if agree(coords, &out[u].coords) {
                        let mut c = coords.clone();
                        c.extend(out[u].coords.iter().map(|(k, v)| (k.clone(), v.clone())));
                        let mut i = inputs.clone();
                        i.insert(slot.clone(), u);
                        next.push((c, i));
                    }
                }
            }
            combos = next;
        }
        let mut base: Params = kind.params().iter().map(|ps| (ps.name.to_string(), (ps.default)())).collect();
        if let Some(d) = p.defaults.get(&s.kind) {
            base.extend(d.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        base.extend(s.params.iter().map(|(k, v)| (k.clone(), v.clone())));
        // Inherited params: those of the kind's list this stage does not set itself. They
        // rank below stage params and sweep values, so leaving those out of the overlay
        // below is the same as applying the overlay under them.
        let inherit = kind.inherits().map(|inh| {
            let own = |p: &str| {
                s.params.contains_key(p) || s.refs.iter().any(|r| r.param == p) || s.grid.iter().chain(&s.zip).any(|(a, _)| a == p)
            };
            (inh.from_kind, inh.params.into_iter().filter(|&p| !own(p)).collect::<Vec<&str>>())
        });
        let points = own_points(s);
        // Params per sweep point, built once; with `${...}` references they also depend on
        // the upstream values, so those are built per distinct set of referenced values.
        let point_params: Vec<Arc<Params>> = points
            .iter()
            .map(|pt| {
                let mut params = base.clone();
                params.extend(pt.iter().map(|(a, v)| (a.clone(), v.clone())));
                Arc::new(params)
            })
            .collect();
        let mut with_refs: BTreeMap<(usize, String), Arc<Params>> = BTreeMap::new();
        let mut mine = Vec::with_capacity(reserve(combos.len().saturating_mul(points.len())));
        for (coords, inputs) in combos {
            // Inherited and referenced upstream values: the same for every point of this
            // combination.
            let mut refs: Vec<(&str, Json)> = Vec::new();
            if let Some((from, names)) = &inherit
                && let Some(u) = nearest_upstream(&out, &inputs, |x| x.kind == *from)
            {
                refs.extend(names.iter().filter_map(|n| Some((*n, out[u].params.get(*n)?.clone()))));
            }
            refs.extend(s.refs.iter().filter_map(|r| {
                let u = find_upstream(&out, &inputs, |x| x.stage == r.stage)?;
                Some((r.param.as_str(), out[u].params.get(&r.upstream_param)?.clone()))
            }));
            let refs_id = if refs.is_empty() { String::new() } else { serde_json::to_string(&refs).unwrap_or_default() };
            for (pi, pt) in points.iter().enumerate() {
                let params = if refs.is_empty() {
                    point_params[pi].clone()
                } else {
                    with_refs
                        .entry((pi, refs_id.clone()))
                        .or_insert_with(|| {
                            let mut params = (*point_params[pi]).clone();
                            params.extend(refs.iter().map(|(k, v)| (k.to_string(), v.clone())));
                            Arc::new(params)
                        })
                        .clone()
                };
                let mut c = coords.clone();
                for (axis, v) in pt {
                    c.insert(format!("{sname}.{axis}"), v.clone());
                }
                mine.push(out.len());
                out.push(Instance {
                    stage: sname.clone(),
                    kind: s.kind.clone(),
                    label: label(sname, &c, &rank),
                    coords: c,
                    params,
                    inputs: inputs.clone(),
                });
            }
        }
        by_stage.insert(sname.as_str(), mine);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(name: &str, inputs: &[(&str, &str)], grid: Vec<(&str, Vec<Json>)>, zip: Vec<(&str, Vec<Json>)>) -> StageSpec {
        StageSpec {
            name: name.into(),
            kind: "x".into(),
            params: Default::default(),
            inputs: inputs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect(),
            grid: grid.into_iter().map(|(a, v)| (a.to_string(), v)).collect(),
            zip: zip.into_iter().map(|(a, v)| (a.to_string(), v)).collect(),
            resources: Default::default(),
            refs: vec![],
        }
    }

    #[test]
    fn grid_and_zip_points() {
        let s = spec(
            "t",
            &[],
            vec![("a", vec![json!(1), json!(2)]), ("b", vec![json!("x"), json!("y"), json!("z")])],
            vec![("c", vec![json!(1), json!(2)]), ("d", vec![json!(3), json!(4)])],
        );
        let pts = own_points(&s);
        assert_eq!(pts.len(), 2 * 3 * 2);
        assert!(pts.iter().all(|p| p["d"].as_i64() == p["c"].as_i64().map(|c| c + 2)));
    }

    #[test]
    fn the_indexed_join_finds_what_the_pairwise_test_finds() {
        let inst = |coords: Vec<(&str, Json)>| Instance {
            stage: "u".into(),
            kind: "x".into(),
            label: String::new(),
            coords: coords.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            params: Arc::new(Params::new()),
            inputs: BTreeMap::new(),
        };
        let combo = |coords: Vec<(&str, Json)>| (coords.into_iter().map(|(k, v)| (k.to_string(), v)).collect(), BTreeMap::new());
        let pairwise = |out: &[Instance], ups: &[usize], c: &BTreeMap<String, Json>| -> Vec<usize> {
            ups.iter().copied().filter(|&u| agree(c, &out[u].coords)).collect()
        };
        let joined = |out: &[Instance], ups: &[usize], combos: &[(BTreeMap<String, Json>, BTreeMap<String, usize>)]| -> Vec<Vec<usize>> {
            let j = Join::new(out, ups, combos);
            combos.iter().map(|(c, _)| j.candidates(c, ups).iter().copied().filter(|&u| agree(c, &out[u].coords)).collect()).collect()
        };
        // Shared axis `a` (with 0.0 and -0.0, which are equal), own axis `b` upstream.
        let out: Vec<Instance> = [json!(1), json!(0.0), json!(-0.0), json!(1.0), json!("1")]
            .into_iter()
            .enumerate()
            .map(|(i, a)| inst(vec![("s.a", a), ("u.b", json!(i))]))
            .collect();
        let ups: Vec<usize> = (0..out.len()).collect();
        let combos: Vec<_> = [json!(1), json!(-0.0), json!(0.0), json!("1"), json!(2)]
            .into_iter()
            .map(|a| combo(vec![("s.a", a), ("t.c", json!(0))]))
            .collect();
        let want: Vec<Vec<usize>> = combos.iter().map(|(c, _)| pairwise(&out, &ups, c)).collect();
        assert_eq!(joined(&out, &ups, &combos), want);
        assert_eq!(want, vec![vec![0], vec![1, 2], vec![1, 2], vec![4], vec![]]);
        // Axes that differ between upstream instances: every pair is tested.
        let mut odd = out.clone();
        odd.push(inst(vec![("s.a", json!(2))]));
        let ups: Vec<usize> = (0..odd.len()).collect();
        let want: Vec<Vec<usize>> = combos.iter().map(|(c, _)| pairwise(&odd, &ups, c)).collect();
        assert_eq!(joined(&odd, &ups, &combos), want);
        assert_eq!(want[4], vec![5]);
    }

    #[test]
    fn labels_disambiguate_same_param_names() {
        let mut c = BTreeMap::new();
        c.insert("cams.method".to_string(), json!("gradcam"));
        c.insert("masks.method".to_string(), json!("otsu"));
        c.insert("train.arch".to_string(), json!("vgg-small"));
        let rank: BTreeMap<&str, usize> = [("train", 0), ("cams", 1), ("masks", 2)].into_iter().collect();
        assert_eq!(label("masks", &c, &rank), "masks[arch=vgg-small,cams.method=gradcam,masks.method=otsu]");
        assert_eq!(label("data", &BTreeMap::new(), &rank), "data");
    }

    fn load(yaml: &str) -> (Pipeline, Vec<String>, Catalog) {
        let catalog = crate::stages::catalog();
        let p = crate::spec::parse(std::path::Path::new("p.yaml"), yaml, &[], &catalog).expect("valid");
        let order = crate::dag::stage_order(&p.stages);
        (p, order, catalog)
    }

    const STUDY: &str = "name: s\nstages:\n  d:\n    kind: data\n    params: {source: synthetic}\n  t:\n    kind: train\n    inputs: {data: d}\n    sweep:\n      grid: {epochs: [1, 2, 3]}\n  c:\n    kind: gradcam\n    inputs: {model: t, data: d}\n  m:\n    kind: threshold\n    inputs: {heatmaps: c}\n    sweep:\n      grid: {value: [0.3, 0.5]}\n  r:\n    kind: retrain\n    inputs: {data: f}\n    params: {epochs: \"${t.epochs}\"}\n  f:\n    kind: filter\n    inputs: {data: d, heatmaps: c}\n";

    #[test]
    fn counts_match_expansion_and_params_are_shared_per_point() {
        let (p, order, catalog) = load(STUDY);
        let inst = expand(&p, &order, &catalog);
        let counts = counts(&p, &order);
        assert_eq!(counts.values().map(|c| c.unwrap()).sum::<u64>(), inst.len() as u64);
        assert_eq!(counts["m"], Some(6));
        let m: Vec<&Instance> = inst.iter().filter(|i| i.stage == "m").collect();
        // Same threshold, different upstream training: one shared map.
        let same: Vec<&&Instance> = m.iter().filter(|i| i.params["value"] == 0.5).collect();
        assert_eq!(same.len(), 3);
        assert!(same.windows(2).all(|w| Arc::ptr_eq(&w[0].params, &w[1].params)));
        // `${t.epochs}`: each retrain gets its own training's value.
        for r in inst.iter().filter(|i| i.stage == "r") {
            assert_eq!(r.params["epochs"], r.coords["t.epochs"], "{}", r.label);
        }
        assert_eq!(check_count(&p, &order, inst.len() as u64).ok(), Some(inst.len() as u64));
        let e = check_count(&p, &order, 5).expect_err("over the limit");
        assert_eq!(e.errors[0].field, "stages.t.sweep");
        assert_eq!(e.errors[0].location, Some((9, 5)));
        assert!(e.errors[0].message.starts_with("the sweeps expand to 19 instances (stage `m`: 6), above the limit of 5"), "{e}");
    }

    const RETRAIN: &str = "name: s\ndefaults:\n  retrain: {lr: 0.5}\nstages:\n  d:\n    kind: data\n  t:\n    kind: train\n    inputs: {data: d}\n    params: {batch_norm: true, epochs: 3, lr: 0.01}\n    sweep:\n      grid: {arch: [vgg, resnet]}\n  c:\n    kind: gradcam\n    inputs: {model: t, data: d}\n  f:\n    kind: filter\n    inputs: {data: d, heatmaps: c}\n  r:\n    kind: retrain\n    inputs: {data: f}\n    params: {flip: false}\n    sweep:\n      grid: {epochs: [3, 4]}\n";

    #[test]
    fn retrain_inherits_from_its_train_and_explicit_values_win() {
        let (p, order, catalog) = load(RETRAIN);
        let inst = expand(&p, &order, &catalog);
        let rs: Vec<usize> = (0..inst.len()).filter(|&i| inst[i].stage == "r").collect();
        assert_eq!(rs.len(), 4);
        for &i in &rs {
            let r = &inst[i];
            // Not set on the retrain stage: the upstream train's (its sweep value, its params),
            // above the pipeline's `defaults: retrain`.
            assert_eq!(r.params["arch"], r.coords["t.arch"], "{}", r.label);
            assert_eq!(r.params["batch_norm"], json!(true));
            assert_eq!(r.params["lr"], json!(0.01));
            // Set on the stage (a param, a sweep value): kept, and flagged where it differs.
            assert_eq!(r.params["flip"], json!(false));
            let m = inherit_mismatches(&inst, i, &catalog);
            let names: Vec<&str> = m.iter().map(|x| x.param.as_str()).collect();
            if r.params["epochs"] == 3 {
                assert_eq!(names, ["flip"], "{}", r.label);
            } else {
                assert_eq!(names, ["epochs", "flip"], "{}", r.label);
            }
            assert_eq!(m[0].upstream_label, format!("t[arch={}]", show_value(&r.coords["t.arch"])));
        }
        let text = describe_mismatches(&inherit_mismatches(&inst, rs[1], &catalog));
        assert!(text.starts_with("epochs=4 (t[arch=vgg]: 3); flip=false (t[arch=vgg]: true)"), "{text}");
        // A train instance inherits nothing and mismatches nothing.
        let t = inst.iter().position(|i| i.stage == "t").unwrap();
        assert!(inherit_mismatches(&inst, t, &catalog).is_empty());
    }

    #[test]
    fn a_param_the_architecture_or_optimizer_ignores_is_no_mismatch() {
        let spec = RETRAIN.replace("params: {flip: false}", "params: {flip: false, batch_norm: false, momentum: 0.5}");
        let (p, order, catalog) = load(&spec);
        let inst = expand(&p, &order, &catalog);
        for i in (0..inst.len()).filter(|&i| inst[i].stage == "r" && inst[i].params["epochs"] == 3) {
            let names: Vec<String> = inherit_mismatches(&inst, i, &catalog).into_iter().map(|m| m.param).collect();
            // vgg reads batch_norm, resnet always has it; Adam reads no momentum.
            let expected: &[&str] = if inst[i].params["arch"] == "vgg" { &["batch_norm", "flip"] } else { &["flip"] };
            assert_eq!(names, expected, "{}", inst[i].label);
        }
    }

    #[test]
    fn inherited_params_exist_with_the_same_type_upstream() {
        let catalog = crate::stages::catalog();
        for k in &catalog.kinds {
            let Some(inh) = k.inherits() else { continue };
            let from = catalog.get(inh.from_kind).unwrap_or_else(|| panic!("{} inherits from unknown kind {}", k.name(), inh.from_kind));
            assert!(!inh.params.is_empty());
            for name in &inh.params {
                let ty = |kind: &dyn crate::stage_kind::StageKind| kind.params().into_iter().find(|p| p.name == *name).map(|p| p.ty);
                assert!(ty(k.as_ref()).is_some(), "{}: {name}", k.name());
                assert_eq!(ty(k.as_ref()), ty(from), "{}.{name}", k.name());
            }
        }
        assert!(catalog.get("retrain").and_then(|k| k.inherits()).is_some_and(|i| i.params.contains(&"batch_norm")));
    }

    #[test]
    fn pairing_agrees_on_shared_axes() {
        let mut a = BTreeMap::new();
        a.insert("train.arch".to_string(), json!("a"));
        let mut b = a.clone();
        b.insert("masks.t".to_string(), json!(0.5));
        let mut other = BTreeMap::new();
        other.insert("train.arch".to_string(), json!("b"));
        assert!(agree(&a, &b));
        assert!(!agree(&other, &b));
    }
}
