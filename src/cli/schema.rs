//! `camflow schema`: a JSON Schema (draft 2020-12) of the pipeline format, generated from the
//! stage catalog, so that YAML language servers complete and check pipelines as they are typed.
//!
//! It mirrors what `spec` accepts: the top-level keys, `defaults` per kind, and per stage its
//! `kind`, typed `params` (ranges, choices, defaults and docs from each kind's `ParamSpec`),
//! `inputs` by slot, `sweep` grid/zip axes (lists of values of the param's type) and
//! `resources`. A stage param may also be a `${stage.param}` reference. What a schema cannot
//! say (references to an upstream stage, zipped axes of equal length, a param given both fixed
//! and swept) is still checked by `camflow plan`, with line and column.

use serde_json::{Map, Value as Json, json};

use crate::stage_kind::{Catalog, ParamSpec, ParamType, StageKind};

/// The schema of a param's values (without the `${...}` alternative).
fn value_schema(ty: &ParamType) -> Json {
    match ty {
        ParamType::Int { min, max } => {
            let mut s = json!({ "type": "integer" });
            if *min != i64::MIN {
                s["minimum"] = json!(min);
            }
            if *max != i64::MAX {
                s["maximum"] = json!(max);
            }
            s
        }
        ParamType::Float { min, max } => {
            let mut s = json!({ "type": "number" });
            if min.is_finite() {
                s["minimum"] = json!(min);
            }
            if max.is_finite() {
                s["maximum"] = json!(max);
            }
            s
        }
        ParamType::Bool => json!({ "type": "boolean" }),
        ParamType::Str => json!({ "type": "string" }),
        ParamType::Choice(c) => json!({ "enum": c }),
        ParamType::IntOrStr => json!({ "type": ["integer", "string"] }),
        ParamType::FloatList => json!({ "type": "array", "items": { "type": "number" } }),
        ParamType::IntList => json!({ "type": "array", "items": { "type": "integer" } }),
        ParamType::StrList => json!({ "type": "array", "items": { "type": "string" } }),
    }
}

/// A param as a key of `params` or `defaults`: its values, documented, with its default.
fn param_schema(p: &ParamSpec, allow_ref: bool) -> Json {
    let values = value_schema(&p.ty);
    let mut s = if allow_ref { json!({ "anyOf": [values, { "$ref": "#/$defs/reference" }] }) } else { values };
    s["description"] = json!(format!("{} ({})", p.doc, p.ty.describe()));
    let d = (p.default)();
    if !d.is_null() {
        s["default"] = d;
    }
    s
}

fn params_object(kind: &dyn StageKind, allow_ref: bool) -> Json {
    let props: Map<String, Json> = kind.params().iter().map(|p| (p.name.to_string(), param_schema(p, allow_ref))).collect();
    json!({ "type": "object", "additionalProperties": false, "properties": props })
}

/// `grid` or `zip`: param -> non-empty list of its values. Grid values must be distinct.
fn axes_object(kind: &dyn StageKind, distinct: bool) -> Json {
    let props: Map<String, Json> = kind
        .params()
        .iter()
        .map(|p| {
            let mut s = json!({
                "type": "array",
                "minItems": 1,
                "items": value_schema(&p.ty),
                "description": format!("values of `{}`: {}", p.name, p.doc),
            });
            if distinct {
                s["uniqueItems"] = json!(true);
            }
            (p.name.to_string(), s)
        })
        .collect();
    json!({ "type": "object", "additionalProperties": false, "properties": props })
}

/// One stage of `kind`: the whole object, so a language server offers exactly its params.
fn stage_schema(kind: &dyn StageKind) -> Json {
    let inputs: Map<String, Json> = kind
        .inputs()
        .iter()
        .map(|s| {
            let req = if s.required { "required" } else { "optional" };
            (
                s.name.to_string(),
                json!({ "type": "string", "description": format!("upstream stage producing {} ({req}): {}", s.artifact.name(), s.doc) }),
            )
        })
        .collect();
    let required_inputs: Vec<&str> = kind.inputs().iter().filter(|s| s.required).map(|s| s.name).collect();
    let mut inputs = json!({ "type": "object", "additionalProperties": false, "properties": inputs });
    if !required_inputs.is_empty() {
        inputs["required"] = json!(required_inputs);
    }
    let mut stage = json!({
        "type": "object",
        "description": kind.doc(),
        "required": ["kind"],
        "additionalProperties": false,
        "properties": {
            "kind": { "const": kind.name(), "description": kind.doc() },
            "description": { "description": "free text for people" },
            "params": params_object(kind, true),
            "inputs": inputs,
            "sweep": {
                "type": "object",
                "description": "sweep axes: `grid` takes the product of its axes, `zip` pairs its axes row by row (equal lengths); grid x zip rows",
                "additionalProperties": false,
                "properties": { "grid": axes_object(kind, true), "zip": axes_object(kind, false) },
            },
            "resources": {
                "type": "object",
                "description": "slots the instance holds while it runs",
                "additionalProperties": false,
                "properties": {
                    "cpu": { "type": "integer", "minimum": 1, "maximum": 1024, "description": "CPU slots (of `run --jobs`)" },
                    "gpu": {
                        "type": "number",
                        "minimum": 0,
                        "maximum": 1024,
                        "anyOf": [{ "type": "integer" }, { "exclusiveMaximum": 1 }],
                        "description": "whole GPUs (of `run --gpus`), or a fraction of one shared with other instances (0.25)",
                    },
                    "mem": { "$ref": "#/$defs/mem" },
                    "time": { "$ref": "#/$defs/time" },
                },
            },
        },
    });
    // `seeds: N` repeats a stage over N seeds; only kinds with a `seed` param take it.
    if kind.params().iter().any(|p| p.name == "seed") {
        stage["properties"]["seeds"] = json!({
            "type": "integer",
            "minimum": 1,
            "maximum": crate::spec::MAX_SEEDS,
            "description": "repeat this stage over N seeds (a `seed` axis from the pipeline seed up)",
        });
    }
    stage
}

/// The `executor:` block (also the whole of a `--profile` file's one key).
fn executor_schema(kinds: &[&str]) -> Json {
    let strings = json!({ "type": "array", "items": { "type": "string" } });
    let name_or_null = json!({ "type": ["string", "null"] });
    let kind_settings = json!({
        "type": "object",
        "additionalProperties": false,
        "properties": {
            "time": { "$ref": "#/$defs/time" },
            "mem": { "$ref": "#/$defs/mem" },
            "retries": { "type": "integer", "minimum": 0, "maximum": 100, "description": "resubmissions of a failed job" },
            "sbatch": strings,
        },
    });
    let batch: Map<String, Json> =
        kinds.iter().map(|k| (k.to_string(), json!({ "type": "integer", "minimum": 1, "maximum": 100_000 }))).collect();
    json!({
        "type": "object",
        "description": "where instances run (`--executor`, `--profile` override it); never part of a cache key",
        "additionalProperties": false,
        "properties": {
            "kind": { "enum": ["local", "slurm"], "default": "local" },
            "partition": name_or_null,
            "account": name_or_null,
            "qos": name_or_null,
            "max_jobs": { "type": "integer", "minimum": 1, "maximum": 1_000_000, "default": crate::spec::executor::DEFAULT_MAX_JOBS, "description": "Slurm jobs in flight (an array task counts one)" },
            "sbatch": strings,
            "arrays": { "type": "boolean", "default": true, "description": "submit wide stages as job arrays" },
            "on_controller": { "type": "array", "items": { "enum": kinds }, "description": "stage kinds the controller runs itself" },
            "batch": { "type": "object", "additionalProperties": false, "properties": batch, "description": "instances per job, by stage kind" },
            "poll": {
                "type": "object",
                "additionalProperties": false,
                "properties": {
                    "min_s": { "type": "number", "exclusiveMinimum": 0, "maximum": 3600 },
                    "max_s": { "type": "number", "exclusiveMinimum": 0, "maximum": 3600 },
                    "give_up_s": { "type": "number", "exclusiveMinimum": 0, "maximum": 86400, "default": 600, "description": "squeue failing this long in a row fails the run's Slurm jobs" },
                },
            },
            "kinds": { "type": "object", "description": "per stage kind or stage name: what sbatch is asked for", "additionalProperties": kind_settings },
        },
    })
}

/// The pipeline schema for the kinds of `catalog`.
pub fn schema(catalog: &Catalog) -> Json {
    let names = catalog.names();
    let mut defs = Map::new();
    defs.insert(
        "reference".into(),
        json!({
            "type": "string",
            "pattern": r"^\s*\$\{[^.}]+\.[^}]+\}\s*$",
            "description": "`${stage.param}`: the value of a param of an upstream stage",
        }),
    );
    let mut branches = Vec::new();
    for k in &catalog.kinds {
        let def = format!("stage-{}", k.name());
        defs.insert(def.clone(), stage_schema(k.as_ref()));
        branches.push(json!({
            "if": { "properties": { "kind": { "const": k.name() } }, "required": ["kind"] },
            "then": { "$ref": format!("#/$defs/{def}") },
        }));
    }
    // `kind` is checked first (any object with a known kind), then the kind's own shape.
    defs.insert(
        "stage".into(),
        json!({
            "type": "object",
            "required": ["kind"],
            "properties": { "kind": { "enum": names, "description": "the stage kind (`camflow kinds` lists them)" } },
            "allOf": branches,
        }),
    );
    defs.insert(
        "mem".into(),
        json!({
            "type": ["string", "integer"],
            "pattern": r"^\s*[0-9.]+\s*([KkMmGgTt](i?[Bb])?|[Bb])?\s*$",
            "description": "memory a cluster job asks for (`--mem`): `512M`, `4G`; a bare number is MiB. Not enforced locally",
        }),
    );
    defs.insert(
        "time".into(),
        json!({
            "type": "string",
            "pattern": r"^\s*([0-9]+[smhd]|[0-9]+(:[0-9]+){1,2}|[0-9]+-[0-9]+(:[0-9]+){0,2})\s*$",
            "description": "time limit of a cluster job (`--time`): `90s`, `30m`, `2h`, or sbatch's forms: `MM:SS`, `HH:MM:SS`, `D-HH`, `D-HH:MM`, `D-HH:MM:SS` (a bare number is refused as ambiguous). Not enforced locally",
        }),
    );
    defs.insert("executor".into(), executor_schema(&names));
    let defaults: Map<String, Json> = catalog.kinds.iter().map(|k| (k.name().to_string(), params_object(k.as_ref(), false))).collect();
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "camflow pipeline",
        "description": "A camflow pipeline: named stages of known kinds, wired by their inputs, with sweep axes. Generated by `camflow schema`.",
        "type": "object",
        "required": ["name", "stages"],
        "additionalProperties": false,
        "properties": {
            "name": { "type": "string", "pattern": r"\S", "description": "the pipeline's name (names its cache entries and lock file)" },
            "description": { "description": "free text for people" },
            "seed": { "type": "integer", "minimum": 0, "default": 0, "description": "the pipeline seed: part of every cache key" },
            "backend": { "enum": crate::ml::backend::NAMES, "default": "cpu", "description": "numeric backend (`--backend` overrides it)" },
            "defaults": {
                "type": "object",
                "description": "params for every stage of a kind (stage params and sweep values override them)",
                "additionalProperties": false,
                "properties": defaults,
            },
            "executor": { "$ref": "#/$defs/executor" },
            "stages": {
                "type": "object",
                "minProperties": 1,
                "description": "the stages, by name (no `.`, `[`, `]`, `=`, `,`, `$`, `{`, `}` or blanks)",
                "propertyNames": { "pattern": "^[^.\\[\\]=,${}\\s]+$" },
                "additionalProperties": { "$ref": "#/$defs/stage" },
            },
        },
        "$defs": defs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_carry_types_ranges_defaults_and_docs() {
        let s = schema(&crate::stages::catalog());
        let epochs = &s["$defs"]["stage-train"]["properties"]["params"]["properties"]["epochs"];
        let values = &epochs["anyOf"][0];
        assert_eq!(values["type"], "integer");
        assert_eq!(values["minimum"], 0);
        assert_eq!(values["maximum"], 100_000);
        assert_eq!(epochs["default"], 5);
        assert!(epochs["description"].as_str().unwrap().contains("passes over the train split"));
        assert_eq!(epochs["anyOf"][1]["$ref"], "#/$defs/reference");
        // Defaults take no references; every kind has a branch.
        assert_eq!(s["properties"]["defaults"]["properties"]["train"]["properties"]["epochs"]["type"], "integer");
        assert_eq!(s["$defs"]["stage"]["allOf"].as_array().unwrap().len(), crate::stages::catalog().kinds.len());
    }

    /// The keys the spec parser accepts are exactly the schema's: a key added to one and not
    /// the other fails here.
    #[test]
    fn keys_match_what_the_spec_accepts() {
        use crate::spec::{RESOURCE_KEYS, STAGE_KEYS, SWEEP_KEYS, TOP_KEYS};
        let s = schema(&crate::stages::catalog());
        let keys = |v: &Json| -> Vec<String> {
            let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
            k.sort();
            k
        };
        let sorted = |k: &[&str]| -> Vec<String> {
            let mut k: Vec<String> = k.iter().map(|s| s.to_string()).collect();
            k.sort();
            k
        };
        assert_eq!(keys(&s["properties"]), sorted(TOP_KEYS));
        let train = &s["$defs"]["stage-train"]["properties"];
        assert_eq!(keys(train), sorted(STAGE_KEYS));
        assert_eq!(keys(&train["sweep"]["properties"]), sorted(SWEEP_KEYS));
        assert_eq!(keys(&train["resources"]["properties"]), sorted(RESOURCE_KEYS));
        use crate::spec::executor::{EXECUTOR_KEYS, KIND_KEYS, POLL_KEYS};
        let ex = &s["$defs"]["executor"]["properties"];
        assert_eq!(keys(ex), sorted(EXECUTOR_KEYS));
        assert_eq!(keys(&ex["poll"]["properties"]), sorted(POLL_KEYS));
        assert_eq!(keys(&ex["kinds"]["additionalProperties"]["properties"]), sorted(KIND_KEYS));
        // Kinds without a `seed` param take no `seeds`.
        assert!(s["$defs"]["stage-threshold"]["properties"].get("seeds").is_none());
    }
}
