//! Finding the line and column of a field path (`stages.masks.inputs`) in YAML source.
//!
//! serde_yaml's `Value` carries no spans, so semantic errors found after parsing locate
//! their field by walking block-style keys by indentation. Flow-style maps (`{a: 1}`) are
//! found by searching the parent's line. Best effort: `None` when it cannot tell.

pub fn locate(source: &str, path: &[&str]) -> Option<(usize, usize)> {
    let lines: Vec<&str> = source.lines().collect();
    let mut start = 0usize;
    let mut parent_indent: isize = -1;
    let mut found: Option<(usize, usize)> = None;
    for seg in path {
        let mut hit = None;
        for (i, line) in lines.iter().enumerate().skip(start) {
            let trimmed = line.trim_start();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let indent = (line.len() - trimmed.len()) as isize;
            if indent <= parent_indent && found.is_some() {
                break;
            }
            let body = trimmed.strip_prefix("- ").unwrap_or(trimmed);
            let key_indent = indent + (trimmed.len() - body.len()) as isize;
            if key_matches(body, seg) {
                hit = Some((i, key_indent as usize));
                break;
            }
        }
        // Not a block key: try flow style on the parent's line, `parent: {seg: ...}`.
        if hit.is_none() {
            if let Some((pl, _)) = found {
                let line = lines[pl];
                for pat in [format!("{seg}:"), format!("\"{seg}\":")] {
                    if let Some(c) = line.find(&pat) {
                        return Some((pl + 1, c + 1));
                    }
                }
            }
            return found.map(|(l, c)| (l + 1, c + 1));
        }
        let (l, c) = hit?;
        found = Some((l, c));
        parent_indent = c as isize;
        start = l + 1;
    }
    found.map(|(l, c)| (l + 1, c + 1))
}

fn key_matches(body: &str, seg: &str) -> bool {
    for quote in ["", "\"", "'"] {
        let k = format!("{quote}{seg}{quote}:");
        if body.starts_with(&k) {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_nested_keys() {
        let src = "name: x\nstages:\n  data:\n    kind: data\n  masks:\n    kind: threshold\n    inputs: {heatmaps: cams}\n";
        assert_eq!(locate(src, &["stages", "masks", "kind"]), Some((6, 5)));
        assert_eq!(locate(src, &["stages", "masks", "inputs", "heatmaps"]), Some((7, 14)));
        assert_eq!(locate(src, &["stages", "data"]), Some((3, 3)));
        // A missing leaf points at its nearest parent.
        assert_eq!(locate(src, &["stages", "masks", "params"]), Some((5, 3)));
    }
}
