//! What users of workflow tools expect: progress inside long stages, a JSON Schema of the
//! pipeline format, shell completions, `plan` naming a new sweep point, params that cannot
//! change a result staying out of its key, and `show --sort`/`--where`.

use std::collections::BTreeMap;

use serde_json::{Value as Json, json};

use crate::support::{BIN, Project, lock_of, root};

/// A tiny study with a training, heatmaps, a filter in a mode that ignores `threshold` and one
/// that reads it, thresholded masks and two score stages. `batch` sets the training's steps.
fn study(batch: usize) -> String {
    format!(
        r#"name: conv
seed: 3
stages:
  data:
    kind: data
    params: {{source: synthetic, count: 48, image_size: 16, contrast: 0.8, slices_per_patient: 4}}
  train:
    kind: train
    inputs: {{data: data}}
    params: {{epochs: 2, batch_size: {batch}}}
  original:
    kind: score
    inputs: {{data: data, model: train}}
  cams:
    kind: gradcam
    inputs: {{model: train, data: data}}
    params: {{batch_size: 4}}
  masks:
    kind: threshold
    inputs: {{heatmaps: cams}}
    sweep:
      grid:
        value: [0.3, 0.5]
  seg:
    kind: score
    inputs: {{data: data, masks: masks}}
  filtered:
    kind: filter
    inputs: {{data: data, heatmaps: cams}}
    params: {{threshold: 0.5}}
    sweep:
      grid:
        mode: [multiply, mask]
"#
    )
}

// ---------------------------------------------------------------- progress

/// The progress events of a `--log-format json` run's stderr.
fn progress_events(stderr: &str) -> Vec<Json> {
    stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<Json>(l).ok())
        .filter(|j| j["target"] == "camflow::progress")
        .map(|j| j["fields"].clone())
        .collect()
}

#[test]
fn json_logs_carry_throttled_progress_events_and_numbers_do_not_change() {
    // batch 1: about 30 steps an epoch, so throttling has something to drop.
    let yaml = study(1);
    let with = Project::new(&yaml);
    let p = with.pipeline();
    let run = with.camflow(&["--log-format", "json", "run", p.to_str().unwrap()]).ok();
    let events = progress_events(&run.stderr());

    // Training: epoch/step/total, loss and an ETA, ending at the last step.
    let train: Vec<&Json> = events.iter().filter(|e| e["instance"] == "train").collect();
    assert!(!train.is_empty(), "no training progress in:\n{}", run.stderr());
    for e in &train {
        assert_eq!(e["stage"], "train");
        assert_eq!(e["unit"], "step");
        assert_eq!(e["epochs"], 2);
        assert!(e["loss"].as_f64().is_some_and(|l| l.is_finite() && l > 0.0), "{e}");
        assert!(e["eta_s"].as_f64().is_some_and(|t| t >= 0.0), "{e}");
        assert!(e["done"].as_u64().unwrap() <= e["total"].as_u64().unwrap());
    }
    let last = train.last().unwrap();
    assert_eq!(last["done"], last["total"], "the last step is always reported");
    assert_eq!(last["epoch"], 2);
    let steps = last["total"].as_u64().unwrap();
    // Throttled: at most one event per 100 ms (and the last), not one per step.
    let secs: f64 = run
        .stdout()
        .lines()
        .find_map(|l| l.strip_prefix("done    train  "))
        .and_then(|t| t.trim_end_matches('s').parse().ok())
        .expect("a `done train` line");
    assert!(train.len() as f64 <= secs * 10.0 + 2.0, "{} events in {secs}s", train.len());
    assert!((train.len() as u64) < steps || secs * 10.0 + 2.0 >= steps as f64, "{} events for {steps} steps in {secs}s", train.len());

    // Heatmaps: images.
    let cams: Vec<&Json> = events.iter().filter(|e| e["instance"] == "cams").collect();
    assert!(!cams.is_empty(), "no gradcam progress");
    assert!(cams.iter().all(|e| e["unit"] == "image" && e["epoch"].is_null()));
    assert_eq!(cams.last().unwrap()["done"], 48);

    // stdout stays one line per instance event, no bar or JSON on it.
    for l in run.stdout().lines() {
        assert!(
            ["run ", "done ", "reused ", "summary:", "lock:", "warn", "note:"].iter().any(|p| l.starts_with(p)),
            "unexpected stdout line: {l}"
        );
    }

    // The same pipeline without progress consumers gives the same bytes and metrics.
    let without = Project::new(&yaml);
    without.run(&[]).ok();
    let outputs = |p: &Project| -> BTreeMap<String, serde_yaml::Value> {
        let lock = lock_of(p);
        let entries = lock["instances"].as_mapping().expect("instances in the lock").clone();
        entries
            .into_iter()
            .map(|(k, v)| (k.as_str().unwrap_or_default().to_string(), serde_yaml::to_value((&v["outputs"], &v["metrics"])).unwrap()))
            .collect()
    };
    let (a, b) = (outputs(&with), outputs(&without));
    assert!(!a.is_empty());
    assert_eq!(a, b, "progress reporting changed an output or a metric");
}

// ---------------------------------------------------------------- schema

fn schema() -> Json {
    let out = std::process::Command::new(BIN).arg("schema").output().expect("camflow schema");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("schema is JSON")
}

/// Compiles the schema (boon checks it against the draft 2020-12 meta-schema) and returns a
/// validator for YAML text.
fn validator() -> impl Fn(&str) -> Result<(), String> {
    let mut schemas = boon::Schemas::new();
    let mut compiler = boon::Compiler::new();
    compiler.add_resource("file:///camflow.schema.json", schema()).expect("schema resource");
    let idx = compiler.compile("file:///camflow.schema.json", &mut schemas).unwrap_or_else(|e| panic!("schema does not compile: {e:#}"));
    move |yaml: &str| {
        let v: Json = serde_yaml::from_str(yaml).map_err(|e| format!("yaml: {e}"))?;
        schemas.validate(&v, idx).map_err(|e| format!("{e}"))
    }
}

/// Every ```yaml block of the README that is a pipeline (has `stages:`).
fn readme_pipelines() -> Vec<String> {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    readme
        .split("```yaml\n")
        .skip(1)
        .filter_map(|b| b.split_once("```").map(|(y, _)| y.to_string()))
        .filter(|y| y.lines().any(|l| l.starts_with("stages:")))
        .collect()
}

#[test]
fn schema_accepts_every_shipped_pipeline_and_rejects_broken_ones() {
    let validate = validator();
    let mut checked = 0;
    for entry in std::fs::read_dir(root().join("pipelines")).expect("pipelines/") {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if !name.ends_with(".yaml") || name.ends_with(".lock.yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        validate(&text).unwrap_or_else(|e| panic!("{name} does not match `camflow schema`: {e}"));
        checked += 1;
    }
    assert!(checked >= 2, "found {checked} shipped pipelines");
    let examples = readme_pipelines();
    assert!(!examples.is_empty(), "no pipeline example in the README");
    for y in &examples {
        validate(y).unwrap_or_else(|e| panic!("a README example does not match the schema: {e}\n{y}"));
    }
    let tiny = study(16);
    validate(&tiny).expect("the test study is valid");

    // Each broken pipeline is rejected by the schema and by camflow itself: they agree.
    let broken: Vec<(&str, String)> = vec![
        ("unknown top-level key", tiny.replace("seed: 3", "sed: 3")),
        ("unknown kind", tiny.replace("kind: gradcam", "kind: gradcan")),
        ("param out of range", tiny.replace("epochs: 2", "epochs: -1")),
        ("param of the wrong type", tiny.replace("epochs: 2", "epochs: two")),
        ("unknown param", tiny.replace("epochs: 2", "epoch: 2")),
        ("choice not offered", tiny.replace("mode: [multiply, mask]", "mode: [multiply, mask, blur]")),
        ("sweep axis not a list", tiny.replace("value: [0.3, 0.5]", "value: 0.3")),
        ("repeated grid value", tiny.replace("value: [0.3, 0.5]", "value: [0.3, 0.3]")),
        ("sweep key", tiny.replace("      grid:\n        value", "      grdi:\n        value")),
        ("missing required input", tiny.replace("inputs: {heatmaps: cams}", "inputs: {}")),
        (
            "bad resources",
            tiny.replace(
                "    inputs: {data: data, model: train}\n",
                "    inputs: {data: data, model: train}\n    resources: {gpu: many}\n",
            ),
        ),
        ("backend", tiny.replace("seed: 3", "seed: 3\nbackend: tpu")),
        ("no name", tiny.replace("name: conv\n", "")),
        ("seeds on a kind without a seed", tiny.replace("    inputs: {heatmaps: cams}\n", "    inputs: {heatmaps: cams}\n    seeds: 2\n")),
        ("defaults for an unknown param", tiny.replace("seed: 3", "seed: 3\ndefaults:\n  train: {epoch: 3}")),
    ];
    for (what, y) in &broken {
        assert_ne!(y, &tiny, "{what}: the replacement did not apply");
        assert!(validate(y).is_err(), "{what}: the schema accepts it:\n{y}");
        let p = Project::new(y);
        let plan = p.camflow(&["plan", p.pipeline().to_str().unwrap()]);
        assert_eq!(plan.code(), 2, "{what}: camflow accepts what the schema rejects:\n{}{}", plan.stdout(), plan.stderr());
    }
    // References, pipeline defaults, resources and seeds are part of the format.
    let with_refs = tiny
        .replace("params: {batch_size: 4}", "params: {batch_size: \"${train.batch_size}\"}")
        .replace("seed: 3", "seed: 3\ndefaults:\n  gradcam: {method: gradcam++}")
        .replace("    inputs: {data: data, model: train}\n", "    inputs: {data: data, model: train}\n    resources: {cpu: 1}\n")
        .replace("    params: {epochs: 2, batch_size: 16}\n", "    params: {epochs: 2, batch_size: 16}\n    seeds: 2\n");
    assert!(with_refs.contains("seeds: 2") && with_refs.contains("cpu: 1") && with_refs.contains("gradcam++"));
    validate(&with_refs).unwrap_or_else(|e| panic!("{e}"));
    let p = Project::new(&with_refs);
    p.camflow(&["plan", p.pipeline().to_str().unwrap()]).ok();
}

#[test]
fn schema_documents_params_from_the_catalog() {
    let s = schema();
    assert_eq!(s["$schema"], "https://json-schema.org/draft/2020-12/schema");
    let kinds = std::process::Command::new(BIN).arg("kinds").output().unwrap();
    let kinds = String::from_utf8_lossy(&kinds.stdout);
    let filter = &s["$defs"]["stage-filter"]["properties"]["params"]["properties"];
    assert_eq!(filter["mode"]["anyOf"][0]["enum"], serde_json::json!(["multiply", "inverse", "mask", "inverse-mask"]));
    assert_eq!(filter["threshold"]["default"], 0.5);
    assert_eq!(filter["threshold"]["anyOf"][0]["maximum"], 1.0);
    // Every kind `camflow kinds` lists has its stage shape.
    let names = s["$defs"]["stage"]["properties"]["kind"]["enum"].as_array().unwrap().clone();
    assert!(names.len() >= 7);
    for n in &names {
        let n = n.as_str().unwrap();
        assert!(kinds.contains(n), "{n} is not in `camflow kinds`");
        assert!(s["$defs"][format!("stage-{n}")].is_object(), "no shape for {n}");
    }
}

// ---------------------------------------------------------------- completions

#[test]
fn completions_for_each_shell_name_the_subcommands() {
    for shell in ["bash", "zsh", "fish"] {
        let out = std::process::Command::new(BIN).args(["completions", shell]).output().unwrap();
        assert!(out.status.success(), "{shell}: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.len() > 500, "{shell}: {} bytes", text.len());
        for sub in ["run", "plan", "show", "report", "schema", "completions", "log-format"] {
            assert!(text.contains(sub), "{shell} completions do not mention `{sub}`");
        }
    }
    let bad = std::process::Command::new(BIN).args(["completions", "tcsh"]).output().unwrap();
    assert_eq!(bad.status.code(), Some(2));
}

// ---------------------------------------------------------------- version

#[test]
fn the_long_version_names_the_backends_and_gpu_kernels_of_this_build() {
    let out = std::process::Command::new(BIN).arg("--version").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let mut backends = vec!["cpu"];
    backends.extend(cfg!(feature = "cuda").then_some("cuda"));
    backends.extend(cfg!(feature = "wgpu").then_some("wgpu"));
    assert!(text.contains(&format!("backends: {}", backends.join(", "))), "{text}");
    // The GPU kernel build is named only where a GPU backend is in.
    let kernels = if cfg!(feature = "gpu-tuned") { "GPU kernels: tuned" } else { "GPU kernels: fixed" };
    assert_eq!(text.contains(kernels), backends.len() > 1, "{text}");
    // `-V` stays one short line.
    let short = std::process::Command::new(BIN).arg("-V").output().unwrap();
    assert_eq!(String::from_utf8_lossy(&short.stdout).trim(), format!("camflow {}", env!("CARGO_PKG_VERSION")));
}

// ---------------------------------------------------------------- plan, keys, show

#[test]
fn a_changed_sweep_value_is_planned_as_the_new_point() {
    let yaml = "name: pts\nseed: 1\nstages:\n  data:\n    kind: data\n    params: {source: synthetic, image_size: 16, slices_per_patient: 4}\n    sweep:\n      grid:\n        count: [40, 48]\n";
    let p = Project::new(yaml);
    let pipe = p.pipeline();
    let first = p.camflow(&["plan", pipe.to_str().unwrap()]).ok();
    assert!(first.stdout().contains("never run"), "a first run is a first run:\n{}", first.stdout());
    p.run(&[]).ok();
    p.write(&yaml.replace("[40, 48]", "[40, 56]"));
    let plan = p.camflow(&["plan", pipe.to_str().unwrap()]).ok();
    let out = plan.stdout();
    let line = out.lines().find(|l| l.contains("data[count=56]")).unwrap_or_else(|| panic!("{out}"));
    assert!(line.starts_with("run") && line.ends_with("new sweep point: count=56"), "{line}");
    assert!(out.lines().any(|l| l.starts_with("cached") && l.contains("data[count=40]")), "{out}");
    let json = p.camflow(&["plan", pipe.to_str().unwrap(), "--json"]).ok();
    let j: Json = serde_json::from_str(&json.stdout()).unwrap();
    let row = j["instances"].as_array().unwrap().iter().find(|r| r["instance"] == "data[count=56]").unwrap().clone();
    assert_eq!(row["reason"], "new sweep point: count=56");
}

#[test]
fn a_threshold_that_a_filter_mode_ignores_reruns_nothing() {
    let p = Project::new(&study(16));
    let pipe = p.pipeline();
    p.run(&[]).ok();
    let set = "stages.filtered.params.threshold=0.7";
    let plan = p.camflow(&["plan", pipe.to_str().unwrap(), "--set", set]).ok();
    let out = plan.stdout();
    let state = |label: &str| {
        out.lines().find(|l| l.split_whitespace().nth(1) == Some(label)).unwrap_or_else(|| panic!("{label}:\n{out}")).to_string()
    };
    assert!(state("filtered[mode=multiply]").starts_with("cached"), "{out}");
    // The mask mode reads it: that one, and only that one, reruns.
    assert!(state("filtered[mode=mask]").contains("params changed: threshold 0.5 -> 0.7"), "{out}");
    assert!(out.contains("plan: 1 to run, 0 after them"), "{out}");
    let rerun = p.run(&["--set", set]).ok();
    assert_eq!(rerun.ran(), vec!["filtered[mode=mask]".to_string()]);

    // show: rows without the sort column go last, both ways; --where conditions all hold.
    let show = |args: &[&str]| -> Vec<Json> {
        let mut a = vec!["show", pipe.to_str().unwrap(), "--stage", "seg", "--stage", "original", "--format", "json"];
        a.extend(args);
        serde_json::from_str(&p.camflow(&a).ok().stdout()).unwrap()
    };
    for sort in ["accuracy", "-accuracy", "mean_dice", "-mean_dice"] {
        let rows = show(&["--sort", sort]);
        let col = sort.trim_start_matches('-');
        assert_eq!(rows.len(), 3);
        let has: Vec<bool> = rows.iter().map(|r| r.get(col).is_some_and(|v| !v.is_null())).collect();
        let first_blank = has.iter().position(|h| !h).unwrap_or(has.len());
        assert!(first_blank > 0 && has[first_blank..].iter().all(|h| !h), "--sort {sort}: {has:?}");
    }
    let asc = show(&["--sort", "mean_dice"]);
    let desc = show(&["--sort", "-mean_dice"]);
    assert!(asc[0]["mean_dice"].as_f64() <= asc[1]["mean_dice"].as_f64());
    assert!(desc[0]["mean_dice"].as_f64() >= desc[1]["mean_dice"].as_f64());
    assert_eq!(show(&["--where", "stage=seg", "--where", "value=0.3"]).len(), 1);
    // Numbers match by value, however they are written.
    assert_eq!(show(&["--where", "stage=seg", "--where", "value=0.30"]).len(), 1);
    assert_eq!(show(&["--where", "stage=original", "--where", "value=0.3"]).len(), 0);
}

#[test]
fn params_the_architecture_or_optimizer_ignores_rerun_nothing() {
    // The study's training: vgg-small with Adam, by default.
    let p = Project::new(&study(16));
    let pipe = p.pipeline();
    p.run(&[]).ok();
    let key = |sets: &[&str]| -> Json {
        let mut a = vec!["plan", pipe.to_str().unwrap(), "--json"];
        for s in sets {
            a.extend(["--set", s]);
        }
        let v: Json = serde_json::from_str(&p.camflow(&a).ok().stdout()).unwrap();
        v["instances"].as_array().unwrap().iter().find(|i| i["instance"] == "train").unwrap().clone()
    };
    let base = key(&[]);
    assert_eq!(base["state"], "cached", "{base}");
    // vgg-small reads neither widths, batch_norm nor blocks; Adam reads no momentum.
    for set in ["stages.train.params.widths=[4, 8]", "stages.train.params.batch_norm=true", "stages.train.params.blocks=3", "stages.train.params.momentum=0.5"] {
        let k = key(&[set]);
        assert_eq!((&k["key"], &k["state"]), (&base["key"], &json!("cached")), "{set}: {k}");
    }
    // The architecture that reads widths, and the optimizer that reads momentum, rerun.
    assert_ne!(key(&["stages.train.params.arch=vgg"])["key"], key(&["stages.train.params.arch=vgg", "stages.train.params.widths=[4, 8]"])["key"]);
    let sgd = ["stages.train.params.optimizer=sgd", "stages.train.params.momentum=0.5"];
    assert_ne!(key(&sgd[..1])["key"], key(&sgd)["key"]);
    // The lock, written with the defaults, is reproduced by a run that sets ignored params:
    // they are compared as keyed, not as written.
    let r = p.run(&["--locked", "--set", "stages.train.params.widths=[4, 8]", "--set", "stages.train.params.momentum=0.5"]);
    assert_eq!(r.code(), 0, "{}\n{}", r.stdout(), r.stderr());
    let r = p.run(&["--locked", "--set", "stages.train.params.lr=0.5"]);
    assert_eq!(r.code(), 4, "a keyed param still counts: {}\n{}", r.stdout(), r.stderr());
    assert!(r.stderr().contains("params differ: lr"), "{}", r.stderr());
}

#[test]
fn an_empty_camflow_cache_is_unset_not_the_current_folder() {
    let p = Project::new("name: e\nstages:\n  d:\n    kind: data\n    params: {source: synthetic, count: 8, image_size: 8, slices_per_patient: 2}\n");
    let out = p.cmd(&["run", "p.yaml"]).env("CAMFLOW_CACHE", "").output().expect("camflow runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(p.path().join("cache").join("actions").is_dir(), "the default ./cache is used");
    assert!(!p.path().join("actions").exists() && !p.path().join("objects").exists(), "the project folder is not a cache");
}

#[test]
fn commands_that_only_read_the_cache_never_create_one() {
    let p = Project::new("name: e\nstages:\n  d:\n    kind: data\n    params: {source: synthetic, count: 8, image_size: 8, slices_per_patient: 2}\n");
    // Typed in a folder where nothing ran: each answers about an empty cache and leaves the
    // folder as it was (the default ./cache, and a --cache-dir that does not exist).
    let elsewhere = p.path().join("typo-cache");
    for args in [
        vec!["plan", "p.yaml"],
        vec!["status", "p.yaml"],
        vec!["show", "p.yaml"],
        vec!["verify"],
        vec!["gc"],
        vec!["report", "p.yaml", "-o", "report"],
        vec!["plan", "p.yaml", "--cache-dir", elsewhere.to_str().unwrap()],
    ] {
        let out = p.cmd(&args).output().expect("camflow runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {err}");
        assert!(err.contains("no cache at") && err.contains("nothing has been computed there"), "{args:?}: {err}");
        assert!(!p.path().join("cache").exists() && !elsewhere.exists(), "{args:?} created a cache");
    }
    // An existing folder that holds no cache is not made one; a file or a dangling link in the
    // cache's place is named as such.
    let folder = p.path().join("photos");
    std::fs::create_dir(&folder).unwrap();
    std::fs::write(folder.join("a.jpg"), "x").unwrap();
    let out = p.cmd(&["status", "p.yaml", "--cache-dir", folder.to_str().unwrap()]).output().expect("status");
    assert!(out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no cache at"), "{out:?}");
    assert_eq!(std::fs::read_dir(&folder).unwrap().count(), 1, "nothing planted in the folder");
    std::os::unix::fs::symlink(p.path().join("nowhere"), p.path().join("dangling")).unwrap();
    for (path, what) in [("dangling", "a link to nothing"), ("p.yaml", "not a folder")] {
        let out = p.cmd(&["run", "p.yaml", "--cache-dir", path]).output().expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(what), "{path}: {err}");
    }
    let plan = String::from_utf8_lossy(&p.cmd(&["plan", "p.yaml"]).output().expect("plan").stdout).into_owned();
    assert!(plan.contains("plan: 1 to run, 0 after them, 0 cached"), "{plan}");
    // `run` creates it; from then on the readers read it, quietly.
    let out = p.cmd(&["run", "p.yaml"]).output().expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = p.cmd(&["status", "p.yaml"]).output().expect("status");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("no cache at"));
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 of 1 instances cached"), "{}", String::from_utf8_lossy(&out.stdout));
}
