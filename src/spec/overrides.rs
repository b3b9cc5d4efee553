//! `--set path=value` overrides applied to the YAML before validation.

use serde_yaml::{Mapping, Value as Yaml};

#[derive(Debug, Clone, PartialEq)]
pub struct Override {
    pub path: String,
    pub value: Yaml,
}

impl std::str::FromStr for Override {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (path, value) = s.split_once('=').ok_or_else(|| format!("`{s}`: expected PATH=VALUE, e.g. stages.masks.params.value=0.6"))?;
        if path.trim().is_empty() {
            return Err(format!("`{s}`: empty path"));
        }
        let value: Yaml = serde_yaml::from_str(value).map_err(|e| match super::too_large_number(&e.to_string()) {
            Some(m) => format!("`{s}`: {m}"),
            None => format!("`{s}`: value is not valid YAML: {e}"),
        })?;
        Ok(Override { path: path.trim().to_string(), value })
    }
}

/// Sets `o.path` (dot-separated map keys) to `o.value`, creating maps on the way.
pub fn apply_override(root: &mut Yaml, o: &Override) -> Result<(), String> {
    let mut cur = root;
    let segs: Vec<&str> = o.path.split('.').collect();
    for (i, seg) in segs.iter().enumerate() {
        if cur.is_null() {
            *cur = Yaml::Mapping(Mapping::new());
        }
        let Yaml::Mapping(m) = cur else {
            return Err(format!("`{}` is not a map", segs[..i].join(".")));
        };
        let key = Yaml::String(seg.to_string());
        if i + 1 == segs.len() {
            m.insert(key, o.value.clone());
            return Ok(());
        }
        cur = m.entry(key).or_insert(Yaml::Null);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_nested_values() {
        let mut y: Yaml = serde_yaml::from_str("stages: {m: {params: {value: 0.5}}}").unwrap();
        apply_override(&mut y, &"stages.m.params.value=0.6".parse().unwrap()).unwrap();
        apply_override(&mut y, &"stages.m.sweep.grid.value=[0.1, 0.2]".parse().unwrap()).unwrap();
        assert_eq!(y["stages"]["m"]["params"]["value"].as_f64(), Some(0.6));
        assert_eq!(y["stages"]["m"]["sweep"]["grid"]["value"].as_sequence().map(|s| s.len()), Some(2));
        assert!("novalue".parse::<Override>().is_err());
    }
}
