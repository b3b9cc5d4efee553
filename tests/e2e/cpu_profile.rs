//! The portable CPU numeric profile: the same pipeline run with every kernel level this CPU
//! supports (forced through `CAMFLOW_CPU_KERNELS`, as another CPU would pick it) gives the same
//! lock file, output digests and metrics included. This is the one-machine stand-in for "a
//! colleague with another x86_64 CPU reproduces the lock".

use crate::support::{Project, lock_of};

/// Data, vgg-small and a resnet (batch norm, 1x1 shortcut), Grad-CAM, masks and scores.
const PIPELINE: &str = r#"name: profile
seed: 5
stages:
  data:
    kind: data
    params: {source: synthetic, count: 24, image_size: 16, slices_per_patient: 2}
  train:
    kind: train
    inputs: {data: data}
    params: {epochs: 1, batch_size: 8, widths: [4, 8]}
    sweep:
      grid:
        arch: [vgg-small, resnet]
  cams:
    kind: gradcam
    inputs: {model: train, data: data}
  masks:
    kind: threshold
    inputs: {heatmaps: cams}
    params: {method: otsu}
  seg:
    kind: score
    inputs: {data: data, masks: masks}
  cls:
    kind: score
    inputs: {data: data, model: train}
"#;

/// The kernel levels this CPU can run, as `CAMFLOW_CPU_KERNELS` names them.
fn levels() -> Vec<&'static str> {
    let mut v = vec!["baseline"];
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            v.push("avx2");
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            v.push("avx512");
        }
    }
    v
}

fn run_at(level: &str) -> serde_yaml::Value {
    let p = Project::new(PIPELINE);
    let pl = p.pipeline();
    let cache = p.cache();
    let out = p
        .cmd(&["run", pl.to_str().unwrap(), "--cache-dir", cache.to_str().unwrap()])
        .env("CAMFLOW_CPU_KERNELS", level)
        .output()
        .expect("camflow runs");
    assert!(out.status.success(), "{level}: {}", String::from_utf8_lossy(&out.stderr));
    lock_of(&p)
}

#[test]
fn every_kernel_level_gives_the_same_lock() {
    let levels = levels();
    #[cfg(target_arch = "x86_64")]
    assert!(levels.len() >= 2, "this test needs at least baseline and avx2: {levels:?}");
    let base = run_at(levels[0]);
    let instances = base["instances"].as_mapping().expect("instances");
    // data, then train, cams, masks, seg and cls per architecture.
    assert_eq!(instances.len(), 11, "{base:?}");
    // The lock names the numeric profile of what it holds.
    let class = format!("flex-{}-portable1", std::env::consts::ARCH);
    for arch in ["vgg-small", "resnet"] {
        assert_eq!(base["instances"][format!("train[arch={arch}]").as_str()]["numeric"].as_str(), Some(class.as_str()), "{base:?}");
    }
    // The trainings really produced numbers (not all-cached or empty).
    assert!(base["instances"]["cls[arch=resnet]"]["metrics"].as_mapping().is_some_and(|m| !m.is_empty()), "{base:?}");
    for level in &levels[1..] {
        let other = run_at(level);
        for (label, entry) in instances {
            let theirs = &other["instances"][label];
            assert_eq!(entry["outputs"], theirs["outputs"], "{level}: outputs of {label:?} differ from baseline");
            assert_eq!(entry["metrics"], theirs["metrics"], "{level}: metrics of {label:?} differ from baseline");
            assert_eq!(entry["key"], theirs["key"], "{level}: key of {label:?}");
        }
    }
}

#[test]
fn an_unknown_kernel_level_is_a_clear_error() {
    let p = Project::new(PIPELINE);
    let pl = p.pipeline();
    let cache = p.cache();
    let out = p
        .cmd(&["run", pl.to_str().unwrap(), "--cache-dir", cache.to_str().unwrap()])
        .env("CAMFLOW_CPU_KERNELS", "avx9000")
        .output()
        .expect("camflow runs");
    assert!(!out.status.success());
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("CAMFLOW_CPU_KERNELS=avx9000: expected auto, baseline, avx2 or avx512"), "{text}");
}
