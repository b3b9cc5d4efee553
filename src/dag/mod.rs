//! The validated graph: stage-level cycle detection and the instance graph (petgraph).
//! Pure: no I/O.

use std::collections::BTreeMap;

use petgraph::algo::{kosaraju_scc, toposort};
use petgraph::graph::{DiGraph, NodeIndex};

use crate::spec::StageSpec;
use crate::sweep::Instance;

fn stage_graph(stages: &BTreeMap<String, StageSpec>) -> (DiGraph<String, ()>, BTreeMap<String, NodeIndex>) {
    let mut g = DiGraph::new();
    let mut idx = BTreeMap::new();
    for name in stages.keys() {
        idx.insert(name.clone(), g.add_node(name.clone()));
    }
    for (name, s) in stages {
        for up in s.inputs.values() {
            if let (Some(&a), Some(&b)) = (idx.get(up), idx.get(name)) {
                g.add_edge(a, b, ());
            }
        }
    }
    (g, idx)
}

/// `Err(path)` with a cycle's stage names (first repeated at the end) if there is one.
pub fn stage_cycle(stages: &BTreeMap<String, StageSpec>) -> Result<(), Vec<String>> {
    let (g, _) = stage_graph(stages);
    if toposort(&g, None).is_ok() {
        return Ok(());
    }
    for scc in kosaraju_scc(&g) {
        let self_loop = scc.len() == 1 && g.contains_edge(scc[0], scc[0]);
        if scc.len() < 2 && !self_loop {
            continue;
        }
        // Walk inside the component until a node repeats.
        let inside: std::collections::BTreeSet<NodeIndex> = scc.iter().copied().collect();
        let start = *scc.iter().min_by_key(|n| g[**n].clone()).unwrap_or(&scc[0]);
        let mut path = vec![start];
        let mut cur = start;
        loop {
            let next = g.neighbors(cur).filter(|n| inside.contains(n)).min_by_key(|n| g[*n].clone());
            let Some(n) = next else { break };
            if let Some(pos) = path.iter().position(|&p| p == n) {
                let mut cyc: Vec<String> = path[pos..].iter().map(|&p| g[p].clone()).collect();
                cyc.push(g[n].clone());
                return Err(cyc);
            }
            path.push(n);
            cur = n;
        }
    }
    Err(vec!["<unknown>".into()])
}

/// Stage names in a topological order (ties broken by name, so the order is stable).
pub fn stage_order(stages: &BTreeMap<String, StageSpec>) -> Vec<String> {
    let mut indeg: BTreeMap<&str, usize> = stages.keys().map(|k| (k.as_str(), 0)).collect();
    for s in stages.values() {
        *indeg.get_mut(s.name.as_str()).unwrap_or(&mut 0) += s.inputs.len();
    }
    let mut ready: std::collections::BTreeSet<&str> = indeg.iter().filter(|(_, d)| **d == 0).map(|(k, _)| *k).collect();
    let mut order = Vec::new();
    while let Some(&n) = ready.iter().next() {
        ready.remove(n);
        order.push(n.to_string());
        for s in stages.values() {
            let uses = s.inputs.values().filter(|u| u.as_str() == n).count();
            if uses > 0 {
                let d = indeg.get_mut(s.name.as_str()).expect("stage present");
                *d -= uses;
                if *d == 0 {
                    ready.insert(s.name.as_str());
                }
            }
        }
    }
    order
}

/// The instance graph: an edge from each upstream instance to each consumer.
pub fn instance_graph(instances: &[Instance]) -> DiGraph<usize, String> {
    let mut g = DiGraph::with_capacity(instances.len(), instances.len() * 2);
    let nodes: Vec<NodeIndex> = (0..instances.len()).map(|i| g.add_node(i)).collect();
    for (i, inst) in instances.iter().enumerate() {
        for (slot, &u) in &inst.inputs {
            g.add_edge(nodes[u], nodes[i], slot.clone());
        }
    }
    g
}

fn quote(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

pub fn to_dot(instances: &[Instance]) -> String {
    let mut out = String::from("digraph camflow {\n  rankdir=LR;\n  node [shape=box, fontname=\"Helvetica\"];\n");
    for (i, inst) in instances.iter().enumerate() {
        out.push_str(&format!("  n{i} [label=\"{}\\n({})\"];\n", quote(&inst.label), inst.kind));
    }
    let g = instance_graph(instances);
    for e in g.raw_edges() {
        out.push_str(&format!("  n{} -> n{} [label=\"{}\"];\n", g[e.source()], g[e.target()], quote(&e.weight)));
    }
    out.push_str("}\n");
    out
}

pub fn to_mermaid(instances: &[Instance]) -> String {
    let mut out = String::from("flowchart LR\n");
    for (i, inst) in instances.iter().enumerate() {
        out.push_str(&format!("  n{i}[\"{} ({})\"]\n", inst.label.replace('"', "'"), inst.kind));
    }
    for (i, inst) in instances.iter().enumerate() {
        for (slot, &u) in &inst.inputs {
            out.push_str(&format!("  n{u} -->|{slot}| n{i}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(name: &str, ups: &[&str]) -> (String, StageSpec) {
        (
            name.to_string(),
            StageSpec {
                name: name.into(),
                kind: "k".into(),
                params: Default::default(),
                inputs: ups.iter().enumerate().map(|(i, u)| (format!("in{i}"), u.to_string())).collect(),
                grid: vec![],
                zip: vec![],
                resources: Default::default(),
                refs: vec![],
            },
        )
    }

    #[test]
    fn cycle_path_is_reported() {
        let stages: BTreeMap<_, _> = [st("a", &["c"]), st("b", &["a"]), st("c", &["b"]), st("d", &[])].into_iter().collect();
        assert_eq!(stage_cycle(&stages), Err(vec!["a".into(), "b".into(), "c".into(), "a".into()]));
        let ok: BTreeMap<_, _> = [st("a", &[]), st("b", &["a"]), st("c", &["a", "b"])].into_iter().collect();
        assert!(stage_cycle(&ok).is_ok());
        assert_eq!(stage_order(&ok), vec!["a", "b", "c"]);
    }
}
