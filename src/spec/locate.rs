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

/// Like [`locate`], but always gives a place: the nearest enclosing field that can be found
/// (a missing key points at the map it is missing from), else the first line of content.
pub fn locate_or_nearest(source: &str, path: &[&str]) -> (usize, usize) {
    // `locate` already falls back to the nearest parent it found; a first segment it cannot
    // find (or an empty path) means the document as a whole.
    locate(source, path).unwrap_or_else(|| first_content(source))
}

/// The first character that is neither blank nor in a comment (1:1 for an empty file): where
/// an error about the whole document points.
pub fn first_content(source: &str) -> (usize, usize) {
    for (i, line) in source.lines().enumerate() {
        let t = line.trim_start();
        if !t.is_empty() && !t.starts_with('#') && !t.starts_with("%") && t != "---" {
            return (i + 1, line.chars().count() - t.chars().count() + 1);
        }
    }
    (1, 1)
}

/// The line where a second YAML document starts: a `---` or `...` marker after some content.
pub fn second_document(source: &str) -> Option<(usize, usize)> {
    let mut content = false;
    for (i, line) in source.lines().enumerate() {
        let marker = line.starts_with("---") && line[3..].chars().next().is_none_or(char::is_whitespace);
        if (marker || line.starts_with("...")) && content {
            // After `...` the next document may start without a marker: point at the `...`.
            return Some((i + 1, 1));
        }
        let t = line.trim_start();
        if !marker && !t.is_empty() && !t.starts_with('#') && !t.starts_with('%') {
            content = true;
        }
        if marker && !line[3..].trim().is_empty() && !line[3..].trim_start().starts_with('#') {
            content = true;
        }
    }
    None
}

/// The first alias (`*name`) in the text, where an alias bomb starts to expand.
pub fn first_alias(source: &str) -> Option<(usize, usize)> {
    for (i, line) in source.lines().enumerate() {
        let chars: Vec<char> = line.chars().collect();
        for (c, w) in chars.windows(2).enumerate() {
            let before = if c == 0 { ' ' } else { chars[c - 1] };
            if w[0] == '*' && !w[1].is_whitespace() && (before.is_whitespace() || "[{,:-".contains(before)) {
                return Some((i + 1, c + 1));
            }
        }
        if chars.first() == Some(&'*') && chars.len() > 1 && !chars[1].is_whitespace() {
            return Some((i + 1, 1));
        }
    }
    None
}

/// Where `key` is set the second time in the mapping that starts at `map` (line, column, from
/// 1; serde_yaml reports a duplicate key there): block style, the second line at the map's
/// indentation that starts with `key:`, before the map ends; flow style (`{...}` on one line),
/// the second `key:` on that line. Plain, `"` and `'` keys.
pub fn duplicate_key(source: &str, map: (usize, usize), key: &str) -> Option<(usize, usize)> {
    let lines: Vec<&str> = source.lines().collect();
    let first = *lines.get(map.0.checked_sub(1)?)?;
    let indent = map.1.checked_sub(1)?;
    let start: String = first.chars().skip(indent).collect();
    if start.starts_with('{') {
        let chars: Vec<char> = first.chars().collect();
        let mut seen = 0;
        for c in indent..chars.len() {
            let before = if c == 0 { ' ' } else { chars[c - 1] };
            let rest: String = chars[c..].iter().collect();
            if (before == '{' || before == ',' || before.is_whitespace()) && key_matches(&rest, key) {
                seen += 1;
                if seen == 2 {
                    return Some((map.0, c + 1));
                }
            }
        }
        return None;
    }
    let mut seen = 0;
    for (i, line) in lines.iter().enumerate().skip(map.0 - 1) {
        let body = line.trim_start();
        if body.is_empty() || body.starts_with('#') {
            continue;
        }
        let at = line.chars().count() - body.chars().count();
        // The map's first line may hold a `- ` before its first key.
        let at = if i == map.0 - 1 { indent.max(at) } else { at };
        if at < indent {
            return None;
        }
        let here: String = line.chars().skip(at).collect();
        if at == indent && key_matches(&here, key) {
            seen += 1;
            if seen == 2 {
                return Some((i + 1, at + 1));
            }
        }
    }
    None
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
        assert_eq!(locate_or_nearest(src, &["nope", "deeper"]), (1, 1));
        assert_eq!(locate_or_nearest(src, &["stages", "masks", "inputs", "heatmaps"]), (7, 14));
    }

    #[test]
    fn document_level_places() {
        assert_eq!(first_content("# c\n\n  - a\n"), (3, 3));
        assert_eq!(first_content(""), (1, 1));
        assert_eq!(second_document("name: a\n---\nname: b\n"), Some((2, 1)));
        assert_eq!(second_document("---\nname: a\n"), None);
        assert_eq!(second_document("--- {name: a}\n--- {name: b}\n"), Some((2, 1)));
        assert_eq!(first_alias("a: &x [1]\nb: [*x, *x]\n"), Some((2, 5)));
        assert_eq!(first_alias("a: 2 * 3\n"), None);
    }
}
