//! The shipped pipelines and the README stay valid.

use crate::support::{BIN, Project, root};

#[test]
fn every_shipped_pipeline_loads() {
    let p = Project::new("unused");
    let mut n = 0;
    for e in std::fs::read_dir(root().join("pipelines")).expect("pipelines/").flatten() {
        let path = e.path();
        if path.extension().is_some_and(|x| x == "yaml") && !path.to_string_lossy().ends_with(".lock.yaml") {
            let out = p.camflow(&["dag", path.to_str().unwrap()]);
            assert!(out.out.status.success(), "{}: {}", path.display(), out.stderr());
            n += 1;
        }
    }
    assert!(n >= 2, "expected paper.yaml and lgg.yaml");
}

#[test]
fn paper_pipeline_has_the_papers_sweep() {
    let p = Project::new("unused");
    let pl = root().join("pipelines/paper.yaml");
    let plan = p.camflow(&["plan", pl.to_str().unwrap(), "--json"]).ok();
    let v: serde_json::Value = serde_json::from_str(&plan.stdout()).expect("json");
    let count = |kind: &str| v["instances"].as_array().unwrap().iter().filter(|i| i["kind"] == kind).count();
    // 2 architectures x 3 seeds x {gradcam, gradcam++, random} x (9 thresholds + Otsu),
    // 4 filter modes.
    assert_eq!(count("train"), 6);
    assert_eq!(count("gradcam"), 18);
    assert_eq!(count("threshold"), 180);
    assert_eq!(count("filter"), 72);
    assert_eq!(count("retrain"), 72);
    // retrain follows the architecture of the train instance upstream of it.
    for i in v["instances"].as_array().unwrap().iter().filter(|i| i["kind"] == "retrain") {
        let label = i["instance"].as_str().unwrap();
        let arch = i["params"]["arch"].as_str().unwrap();
        assert!(label.contains(&format!("arch={arch},")), "{label} trains {arch}");
    }
}

#[test]
fn readme_kinds_reference_is_current() {
    let out = std::process::Command::new(BIN).arg("kinds").output().expect("kinds");
    let kinds = String::from_utf8(out.stdout).expect("utf-8");
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    assert!(readme.contains(&kinds), "README's stage kinds reference differs from `camflow kinds`; paste its output");
}

#[test]
fn readme_example_pipeline_is_valid() {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    let start = readme.find("```yaml\n").expect("a yaml block in the README") + "```yaml\n".len();
    let yaml = &readme[start..start + readme[start..].find("```").expect("block end")];
    let p = Project::new(yaml);
    let plan = p.camflow(&["plan", p.pipeline().to_str().unwrap()]).ok();
    assert!(plan.stdout().contains("plan: 1 to run, 24 after them, 0 cached (25 instances)"), "{}", plan.stdout());
}
