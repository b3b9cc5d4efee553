//! Malformed pipelines: the full error text, naming the file, the field and the location.

use crate::support::Project;

const HEAD: &str = "name: bad\nstages:\n  data:\n    kind: data\n    params: {source: synthetic, count: 16, image_size: 16}\n";

fn check(yaml: &str, args: &[&str], expected: &str) {
    let p = Project::new(yaml);
    let pl = p.pipeline();
    let mut a = vec!["plan", pl.to_str().unwrap()];
    a.extend(args);
    let r = p.camflow(&a);
    assert_eq!(r.code(), 2, "yaml:\n{yaml}\nstdout:\n{}\nstderr:\n{}", r.stdout(), r.stderr());
    let got = r.stderr().replace(pl.to_str().unwrap(), "p.yaml");
    assert_eq!(got.trim_end(), expected, "yaml:\n{yaml}");
}

#[test]
fn malformed_pipelines() {
    let cases: Vec<(&str, String, Vec<&str>, &str)> = vec![
        ("syntax error", "name: bad\nstages:\n  data:\n    kind: [data\n".into(), vec![],
         "error: p.yaml:5:1: YAML syntax error: did not find expected ',' or ']'"),
        ("not a map", "- a\n- b\n".into(), vec![],
         "error: p.yaml:1:1: a pipeline must be a map with `name` and `stages`, found a list"),
        ("missing stages", "name: x\n".into(), vec![],
         "error: p.yaml:1:1: missing required key `stages`"),
        ("unknown top-level key", format!("{HEAD}sead: 3\n"), vec![],
         "error: p.yaml:6:1: sead: unknown key `sead`; did you mean `seed`?"),
        ("unknown stage key", format!("{HEAD}  t:\n    kind: train\n    inputs: {{data: data}}\n    parms: {{epochs: 1}}\n"), vec![],
         "error: p.yaml:9:5: stages.t.parms: unknown key `parms`; did you mean `params`?"),
        ("unknown kind", format!("{HEAD}  t:\n    kind: trian\n"), vec![],
         "error: p.yaml:7:5: stages.t.kind: unknown stage kind `trian`; did you mean `train`?"),
        ("unknown param", format!("{HEAD}  t:\n    kind: train\n    inputs: {{data: data}}\n    params: {{epoch: 1}}\n"), vec![],
         "error: p.yaml:9:14: stages.t.params.epoch: unknown key `epoch`; did you mean `epochs`?"),
        ("bad param type", format!("{HEAD}  t:\n    kind: train\n    inputs: {{data: data}}\n    params:\n      epochs: many\n"), vec![],
         "error: p.yaml:10:7: stages.t.params.epochs: expected an integer in 0..=100000, found `many`"),
        ("bad choice", format!("{HEAD}  t:\n    kind: train\n    inputs: {{data: data}}\n    params:\n      optimizer: adma\n"), vec![],
         "error: p.yaml:10:7: stages.t.params.optimizer: expected one of `adam`, `adamw`, `sgd`, found `adma`; did you mean `adam`?"),
        ("unknown stage reference", format!("{HEAD}  t:\n    kind: train\n    inputs: {{data: dat}}\n"), vec![],
         "error: p.yaml:8:14: stages.t.inputs.data: unknown stage `dat`; did you mean `data`? (stages: data, t)"),
        ("wrong artifact type", format!("{HEAD}  t:\n    kind: train\n    inputs: {{data: data}}\n  m:\n    kind: threshold\n    inputs:\n      heatmaps: t\n"), vec![],
         "error: p.yaml:12:7: stages.m.inputs.heatmaps: stage `t` (train) produces model, but input `heatmaps` of threshold needs heatmaps"),
        ("missing required input", format!("{HEAD}  c:\n    kind: gradcam\n    inputs: {{data: data}}\n"), vec![],
         "error: p.yaml:8:5: stages.c.inputs: missing required input `model` (model) of gradcam"),
        ("cycle", "name: cyc\nstages:\n  a:\n    kind: filter\n    inputs: {data: b, heatmaps: h}\n  b:\n    kind: filter\n    inputs: {data: a, heatmaps: h}\n  h:\n    kind: gradcam\n    inputs: {model: t, data: a}\n  t:\n    kind: train\n    inputs: {data: a}\n".into(), vec![],
         "error: p.yaml:5:5: stages.a.inputs: dependency cycle: a -> b -> a"),
        ("empty axis", format!("{HEAD}  t:\n    kind: train\n    inputs: {{data: data}}\n    sweep:\n      grid:\n        lr: []\n"), vec![],
         "error: p.yaml:11:9: stages.t.sweep.grid.lr: sweep axis is empty; give at least one value"),
        ("zip length mismatch", format!("{HEAD}  t:\n    kind: train\n    inputs: {{data: data}}\n    sweep:\n      zip:\n        lr: [0.1, 0.01]\n        epochs: [1, 2, 3]\n"), vec![],
         "error: p.yaml:12:9: stages.t.sweep.zip.epochs: zipped axes must have equal lengths: `lr` has 2, `epochs` has 3"),
        ("axis collision", format!("{HEAD}  t:\n    kind: train\n    inputs: {{data: data}}\n    sweep:\n      grid: {{lr: [0.1]}}\n      zip: {{lr: [0.2]}}\n"), vec![],
         "error: p.yaml:11:13: stages.t.sweep.zip.lr: axis `lr` is swept in both `grid` and `zip`"),
        ("param and axis collide", format!("{HEAD}  t:\n    kind: train\n    inputs: {{data: data}}\n    params: {{lr: 0.1}}\n    sweep:\n      grid:\n        lr: [0.2]\n"), vec![],
         "error: p.yaml:12:9: stages.t.sweep.grid.lr: `lr` is both a fixed param and a sweep axis; keep one"),
        ("bad value inside an axis", format!("{HEAD}  m:\n    kind: threshold\n    inputs: {{heatmaps: m}}\n    sweep:\n      grid:\n        method: [fixed, otsu, triangle]\n"), vec![],
         "error: p.yaml:8:14: stages.m.inputs.heatmaps: stage `m` (threshold) produces masks, but input `heatmaps` of threshold needs heatmaps\nerror: p.yaml:11:9: stages.m.sweep.grid.method: value 3: expected one of `fixed`, `otsu`, `percentile`, found `triangle`\n2 errors in p.yaml"),
        ("bad resources", format!("{HEAD}    resources: {{gpu: -1}}\n"), vec![],
         "error: p.yaml:6:17: stages.data.resources.gpu: expected a whole number of GPUs (0 to 1024) or a fraction of one GPU between 0 and 1 (e.g. 0.25), found `-1`"),
        ("cross-param check", "name: bad\nstages:\n  data:\n    kind: data\n    params:\n      source: lgg\n".to_string(), vec![],
         "error: p.yaml:5:5: stages.data.params.root: is required for this source"),
        ("widths out of range", format!("{HEAD}  t:\n    kind: train\n    inputs: {{data: data}}\n    params: {{arch: vgg, widths: [100000000]}}\n"), vec![],
         "error: p.yaml:9:25: stages.t.params.widths: must be a non-empty list of integers from 1 to 4096"),
        ("more pools than the data's image has pixels", format!("{HEAD}  t:\n    kind: train\n    inputs: {{data: data}}\n    params: {{arch: vgg, widths: [4, 4, 4, 4, 4, 4]}}\n"), vec![],
         "error: p.yaml:9:25: stages.t.params.widths: `vgg` with 6 conv units halves the image 5 time(s) (2x2 max pools): it needs images of at least 32x32, and these are 16x16 (the data's image_size); give fewer widths or larger images"),
        ("bad --set", HEAD.into(), vec!["--set", "stages.data.params.count=lots"],
         "error: p.yaml: stages.data.params.count: expected an integer in 2..=1000000, found `lots` (value from --set)"),
        ("several errors at once", "name: bad\nseed: -1\nstages:\n  d:\n    kind: data\n    params: {imagesize: 3}\n  t:\n    kind: train\n    inputs: {data: nope}\n".into(), vec![],
         "error: p.yaml:2:1: seed: expected a non-negative integer, found a number\nerror: p.yaml:6:14: stages.d.params.imagesize: unknown key `imagesize`; did you mean `image_size`?\nerror: p.yaml:9:14: stages.t.inputs.data: unknown stage `nope` (stages: d, t)\n3 errors in p.yaml"),
        ("stage name with a dot", format!("{HEAD}  a.b:\n    kind: train\n    inputs: {{data: data}}\n"), vec![],
         "error: p.yaml:6:3: stages.a.b: stage name `a.b` contains `.`, which `${stage.param}`, `--set stages.…` or instance labels could not tell apart; a stage name may not hold `.`, `[`, `]`, `=`, `,`, `$`, `{`, `}` or blanks"),
        ("empty stage name", format!("{HEAD}  \"\":\n    kind: train\n    inputs: {{data: data}}\n"), vec![],
         "error: p.yaml:6:3: stages.: a stage name must not be empty"),
        ("score with nothing to score", format!("{HEAD}  s:\n    kind: score\n    inputs: {{data: data}}\n"), vec![],
         "error: p.yaml:8:5: stages.s.inputs: score needs a `masks` input (masks to score against the ground truth), a `model` input (a classifier), or both"),
        ("a top-level key twice", format!("{HEAD}name: again\n"), vec![],
         "error: p.yaml:6:1: `name` is set twice in one mapping; keep one of them"),
        ("a stage twice", format!("{HEAD}  t:\n    kind: train\n    inputs: {{data: data}}\n  data:\n    kind: data\n"), vec![],
         "error: p.yaml:9:3: stages: `data` is set twice in one mapping; keep one of them"),
        ("a param twice, in flow style", format!("{HEAD}  t:\n    kind: train\n    inputs: {{data: data}}\n    params: {{lr: 0.1, epochs: 2, lr: 0.2}}\n"), vec![],
         "error: p.yaml:9:34: stages.t.params: `lr` is set twice in one mapping; keep one of them"),
        ("NaN param", format!("{HEAD}  t:\n    kind: train\n    inputs: {{data: data}}\n    params: {{lr: .nan}}\n"), vec![],
         "error: p.yaml:9:14: stages.t.params.lr: expected a number in [0, 10], found NaN (`.nan`): params must be finite numbers"),
        ("integer beyond 64 bits", format!("{HEAD}  t:\n    kind: train\n    inputs: {{data: data}}\n    params: {{epochs: 99999999999999999999999999}}\n"), vec![],
         "error: p.yaml:9:22: stages.t.params.epochs: the number 99999999999999999999999999 is too large: numbers must lie between -2^63 and 2^64 - 1"),
        ("misspelt --force", HEAD.into(), vec!["--force", "dta"],
         "error: --force dta: no such stage or instance; did you mean `data`? (stages: data)"),
        ("unknown --force", HEAD.into(), vec!["--force", "nope"],
         "error: --force nope: no such stage or instance (stages: data)"),
    ];
    assert!(cases.len() >= 15);
    let mut failures = Vec::new();
    for (name, yaml, args, expected) in &cases {
        if let Err(e) = std::panic::catch_unwind(|| check(yaml, args, expected)) {
            let msg = e.downcast_ref::<String>().cloned().unwrap_or_default();
            failures.push(format!("--- {name}\n{msg}"));
        }
    }
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

#[test]
fn run_force_with_an_unknown_stage_is_refused_before_running() {
    let p = Project::new(HEAD);
    let r = p.run(&["--force", "daat"]);
    assert_eq!(r.code(), 2, "{}\n{}", r.stdout(), r.stderr());
    assert_eq!(r.stderr().trim_end(), "error: --force daat: no such stage or instance; did you mean `data`? (stages: data)");
    assert!(!p.path().join("p.lock.yaml").exists(), "nothing ran");
    // A stage name and an instance label are both accepted.
    p.run(&[]).ok();
    assert_eq!(p.run(&["--force", "data"]).ok().summary("ran"), 1);
}

/// A model explained on data of another stage whose images are too small for it: the
/// instance fails saying why, never with a Rust panic's text (the kernels' shape assertion
/// it used to hit).
#[test]
fn a_model_given_images_too_small_for_it_fails_saying_why() {
    let yaml = "name: sizes\nseed: 1\nstages:\n  big:\n    kind: data\n    params: {source: synthetic, count: 16, image_size: 32}\n  small:\n    kind: data\n    params: {source: synthetic, count: 16, image_size: 8}\n  train:\n    kind: train\n    inputs: {data: big}\n    params: {arch: vgg, epochs: 1, widths: [4, 4, 4, 4, 4, 4]}\n  cams:\n    kind: gradcam\n    inputs: {model: train, data: small}\n";
    let p = Project::new(yaml);
    let r = p.run(&[]);
    assert_eq!(r.code(), 1, "{}\n{}", r.stdout(), r.stderr());
    let all = format!("{}{}", r.stdout(), r.stderr());
    assert!(
        all.contains("FAILED  cams: the model of input `model` cannot read this data: `vgg` with 6 conv units halves the image 5 time(s)"),
        "{all}"
    );
    assert!(!all.contains("panicked"), "{all}");
}
