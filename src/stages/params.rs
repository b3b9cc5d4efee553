//! Typed reads of resolved params. Params were type-checked when the spec was loaded, so a
//! failure here is a bug in a kind's param table, reported as a stage error, not a panic.

use serde_json::Value as Json;

use crate::stage_kind::{Params, StageError};

pub fn str<'a>(p: &'a Params, name: &str) -> Result<&'a str, StageError> {
    p.get(name).and_then(|v| v.as_str()).ok_or_else(|| StageError::new(format!("param `{name}` must be a string")))
}

pub fn opt_str<'a>(p: &'a Params, name: &str) -> Option<&'a str> {
    p.get(name).and_then(|v| v.as_str())
}

pub fn f64(p: &Params, name: &str) -> Result<f64, StageError> {
    p.get(name).and_then(|v| v.as_f64()).ok_or_else(|| StageError::new(format!("param `{name}` must be a number")))
}

pub fn usize(p: &Params, name: &str) -> Result<usize, StageError> {
    p.get(name)
        .and_then(|v| v.as_u64())
        .map(|v| v as usize)
        .ok_or_else(|| StageError::new(format!("param `{name}` must be a non-negative integer")))
}

pub fn opt_u64(p: &Params, name: &str) -> Option<u64> {
    p.get(name).and_then(|v| v.as_u64())
}

pub fn bool(p: &Params, name: &str) -> Result<bool, StageError> {
    p.get(name).and_then(|v| v.as_bool()).ok_or_else(|| StageError::new(format!("param `{name}` must be true or false")))
}

/// Every entry or an error: a negative entry is not dropped from the list.
pub fn usize_list(p: &Params, name: &str) -> Result<Vec<usize>, StageError> {
    p.get(name)
        .and_then(|v| v.as_array())
        .and_then(|a| a.iter().map(|x| x.as_u64().map(|u| u as usize)).collect::<Option<Vec<usize>>>())
        .ok_or_else(|| StageError::new(format!("param `{name}` must be a list of non-negative integers")))
}

pub fn str_list(p: &Params, name: &str) -> Vec<String> {
    p.get(name).and_then(|v| v.as_array()).map(|a| a.iter().filter_map(|x| x.as_str().map(String::from)).collect()).unwrap_or_default()
}

pub fn null() -> Json {
    Json::Null
}
