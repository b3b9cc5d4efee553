//! Sweep expansion: stages x axes -> concrete stage instances. Pure: no fs, env or clock.
//!
//! Each stage contributes its own points (the cartesian product of its `grid` axes, times the
//! rows of its `zip` axes). A stage gets one instance per combination of upstream instances
//! that agree on every axis they share, times its own points. Axes are identified by
//! `stage.param`, so two stages may sweep params of the same name without clashing; instance
//! labels use the short param name unless that would be ambiguous.

use std::collections::BTreeMap;

use serde_json::Value as Json;

use crate::spec::{Pipeline, StageSpec};
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
    /// Fully resolved params: kind defaults < pipeline defaults < stage params < own axes.
    pub params: Params,
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

fn own_points(s: &StageSpec) -> Vec<BTreeMap<String, Json>> {
    let mut points = vec![BTreeMap::new()];
    for (axis, values) in &s.grid {
        let mut next = Vec::with_capacity(points.len() * values.len());
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
        let mut next = Vec::with_capacity(points.len() * first.len());
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
            let mut next = Vec::new();
            for (coords, inputs) in &combos {
                for &u in &ups {
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
        let points = own_points(s);
        let mut mine = Vec::with_capacity(combos.len() * points.len());
        for (coords, inputs) in &combos {
            for pt in &points {
                let mut c = coords.clone();
                let mut params = base.clone();
                for (axis, v) in pt {
                    c.insert(format!("{sname}.{axis}"), v.clone());
                    params.insert(axis.clone(), v.clone());
                }
                for r in &s.refs {
                    if let Some(u) = find_upstream(&out, inputs, |x| x.stage == r.stage)
                        && let Some(v) = out[u].params.get(&r.upstream_param)
                    {
                        params.insert(r.param.clone(), v.clone());
                    }
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
    fn labels_disambiguate_same_param_names() {
        let mut c = BTreeMap::new();
        c.insert("cams.method".to_string(), json!("gradcam"));
        c.insert("masks.method".to_string(), json!("otsu"));
        c.insert("train.arch".to_string(), json!("vgg-small"));
        let rank: BTreeMap<&str, usize> = [("train", 0), ("cams", 1), ("masks", 2)].into_iter().collect();
        assert_eq!(label("masks", &c, &rank), "masks[arch=vgg-small,cams.method=gradcam,masks.method=otsu]");
        assert_eq!(label("data", &BTreeMap::new(), &rank), "data");
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
