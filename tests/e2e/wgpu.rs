//! The GPU code path on burn's wgpu backend: cubecl kernels, device transfers, autodiff on a
//! GPU-style backend, and instances sharing one device. Compiled only with `--features wgpu`;
//! in CI it runs on Debian's lavapipe (a CPU Vulkan driver). With no Vulkan device the run
//! fails and so does this test: it never skips.

use camflow::ml::planes::Planes;

use crate::support::{Project, Run, TINY, lock_of};

/// TINY, with the two retrainings (one per filter mode) sharing the device: half a GPU each,
/// one CPU slot each, so both run at once.
fn shared_tiny() -> String {
    TINY.replace(
        "    inputs: {data: filtered}\n    params: {epochs: 1, batch_size: 16}\n",
        "    inputs: {data: filtered}\n    params: {epochs: 1, batch_size: 16}\n    resources: {gpu: 0.5, cpu: 1}\n",
    )
}

/// `camflow run --backend wgpu`, with a private XDG_RUNTIME_DIR (Vulkan loaders complain
/// without one).
fn run_wgpu(p: &Project, runtime_dir: &std::path::Path) -> Run {
    let pipeline = p.pipeline();
    let cache = p.cache();
    let args = ["run", pipeline.to_str().unwrap(), "--backend", "wgpu", "--jobs", "2", "--gpus", "1", "--cache-dir", cache.to_str().unwrap()];
    Run { out: p.cmd(&args).env("XDG_RUNTIME_DIR", runtime_dir).output().expect("camflow runs") }
}

fn finite_unit(v: &serde_yaml::Value, what: &str) -> f64 {
    let x = v.as_f64().unwrap_or_else(|| panic!("{what}: not a number: {v:?}"));
    assert!(x.is_finite() && (0.0..=1.0).contains(&x), "{what} = {x}");
    x
}

#[test]
fn wgpu_runs_the_tiny_study_with_sane_results_and_a_cached_rerun() {
    let p = Project::new(&shared_tiny());
    let runtime_dir = tempfile::tempdir().expect("temp dir");
    let first = run_wgpu(&p, runtime_dir.path());
    assert!(
        first.out.status.success(),
        "camflow --backend wgpu failed (is a Vulkan driver installed? `apt-get install mesa-vulkan-drivers libvulkan1`):\nstdout:\n{}\nstderr:\n{}",
        first.stdout(),
        first.stderr()
    );
    assert_eq!(first.summary("ran"), 13, "{}", first.stdout());
    let out = first.stdout();
    // Never silently non-deterministic; and the device memory it packs the retrainings into.
    assert!(out.contains("backend `wgpu` is not bitwise deterministic"), "{out}");
    assert!(out.contains("memory per GPU: 4.0 GiB"), "{out}");

    let lock = lock_of(&p);
    assert_eq!(lock["backend"].as_str(), Some("wgpu"));
    assert_eq!(lock["bitwise_deterministic"].as_bool(), Some(false));
    let instances = lock["instances"].as_mapping().expect("instances");
    assert_eq!(instances.len(), 13);
    let mut trained = 0;
    for (label, e) in instances {
        let label = label.as_str().unwrap();
        let kind = e["kind"].as_str().unwrap();
        if matches!(kind, "train" | "retrain" | "gradcam") {
            assert_eq!(e["numeric"].as_str(), Some("wgpu-nondeterministic"), "{label}");
        }
        let m = &e["metrics"];
        match kind {
            "train" | "retrain" => {
                trained += 1;
                finite_unit(&m["accuracy"], &format!("{label} accuracy"));
                for epoch in m["epochs"].as_sequence().expect("epochs") {
                    let loss = epoch["loss"].as_f64().expect("loss");
                    assert!(loss.is_finite() && loss > 0.0, "{label}: loss {loss}");
                }
            }
            "score" if label.starts_with("seg") => {
                finite_unit(&m["dice_all"], &format!("{label} dice"));
            }
            "score" => {
                finite_unit(&m["accuracy"], &format!("{label} accuracy"));
            }
            "threshold" => {
                finite_unit(&m["foreground_fraction"], &format!("{label} foreground"));
            }
            _ => {}
        }
    }
    assert_eq!(trained, 3);

    // Heatmaps: one per image, values in [0, 1], min-max normalised (not all flat).
    let heatmaps = Planes::decode(&std::fs::read(p.object_of("cams", "heatmaps.bin")).unwrap()).expect("heatmaps decode");
    assert_eq!(heatmaps.data.len(), 48);
    assert!(heatmaps.data.iter().flatten().all(|v| v.is_finite() && (0.0..=1.0).contains(v)));
    assert!(heatmaps.data.iter().any(|h| h.iter().cloned().fold(0.0, f32::max) > 0.5), "every heatmap is flat");
    for value in ["0.3", "0.5"] {
        let masks = Planes::decode(&std::fs::read(p.object_of(&format!("masks[value={value}]"), "masks.bin")).unwrap()).unwrap();
        assert_eq!(masks.data.len(), 48);
        assert!(masks.data.iter().flatten().all(|&v| v == 0.0 || v == 1.0));
    }

    // A rerun finds everything cached: keys hold the wgpu class, not a device's bytes.
    let again = run_wgpu(&p, runtime_dir.path()).ok();
    assert_eq!((again.summary("ran"), again.summary("cached")), (0, 13), "{}", again.stdout());
}
