//! The GPU code path on burn's wgpu backend: cubecl kernels, device transfers, autodiff on a
//! GPU-style backend, and instances sharing one device. Compiled only with `--features wgpu`;
//! in CI it runs on Debian's lavapipe (a CPU Vulkan driver), twice: with fixed kernels
//! (`--features wgpu`) and with burn's autotuned, fused ones (`--features wgpu,gpu-tuned`).
//! With no Vulkan device the run fails and so does this test: it never skips.

use camflow::ml::planes::Planes;

use crate::support::{Project, Run, TINY, files_under, lock_of};

/// TINY, with the two retrainings (one per filter mode) sharing the device: half a GPU each,
/// one CPU slot each, so both run at once.
fn shared_tiny() -> String {
    TINY.replace(
        "    inputs: {data: filtered}\n    params: {epochs: 1, batch_size: 16}\n",
        "    inputs: {data: filtered}\n    params: {epochs: 1, batch_size: 16}\n    resources: {gpu: 0.5, cpu: 1}\n",
    )
}

/// `camflow run --backend wgpu`, with a private XDG_RUNTIME_DIR (Vulkan loaders complain
/// without one) and the GPU kernel cache in it (not the user's).
fn run_wgpu(p: &Project, runtime_dir: &std::path::Path) -> Run {
    run_wgpu_with(p, runtime_dir, &[])
}

/// [`run_wgpu`] with more arguments.
fn run_wgpu_with(p: &Project, runtime_dir: &std::path::Path, extra: &[&str]) -> Run {
    let pipeline = p.pipeline();
    let cache = p.cache();
    let mut args =
        vec!["run", pipeline.to_str().unwrap(), "--backend", "wgpu", "--jobs", "2", "--gpus", "1", "--cache-dir", cache.to_str().unwrap()];
    args.extend_from_slice(extra);
    let kernels = runtime_dir.join("kernels");
    Run { out: p.cmd(&args).env("XDG_RUNTIME_DIR", runtime_dir).env("CAMFLOW_KERNEL_CACHE", kernels).output().expect("camflow runs") }
}

fn finite_unit(v: &serde_yaml::Value, what: &str) -> f64 {
    let x = v.as_f64().unwrap_or_else(|| panic!("{what}: not a number: {v:?}"));
    assert!(x.is_finite() && (0.0..=1.0).contains(&x), "{what} = {x}");
    x
}

/// The build's kernel choice is the backend type itself: burn's fusion wraps the wgpu backend
/// exactly in a `gpu-tuned` build (its autotuning: `wgpu_fused_members_train_as_they_do_alone`).
#[test]
fn the_wgpu_backend_is_fused_exactly_in_a_tuned_build() {
    let name = std::any::type_name::<burn::backend::Wgpu>();
    assert_eq!(name.contains("Fusion"), cfg!(feature = "gpu-tuned"), "{name}");
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
    let kernels = if cfg!(feature = "gpu-tuned") { "(tuned GPU kernels" } else { "(fixed GPU kernels" };
    assert!(out.contains(kernels), "{out}");
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
            // The class names the build's kernels (a fixed-kernel build's results are keyed
            // apart from a `gpu-tuned` one's).
            let class = if cfg!(feature = "gpu-tuned") { "wgpu-nondeterministic" } else { "wgpu-fixed-nondeterministic" };
            assert_eq!(e["numeric"].as_str(), Some(class), "{label}");
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

/// Two trainings of one shape (a seed axis), two epochs each.
const TWO_TRAININGS: &str = r#"name: fuse-wgpu
seed: 7
stages:
  data:
    kind: data
    params: {source: synthetic, count: 48, image_size: 16, contrast: 0.8, slices_per_patient: 4}
  train:
    kind: train
    inputs: {data: data}
    params: {epochs: 2, batch_size: 16}
    seeds: 2
"#;

/// Fused training on a GPU-style backend: the two trainings run as one stacked model (burn's
/// grouped convolution and batched matmul, the path CUDA takes), and each member's losses are
/// those of its training alone up to the device's rounding. A wrong stacking (members mixed,
/// a loss not a member's own) moves them by far more than the tolerance.
#[test]
fn wgpu_fused_members_train_as_they_do_alone() {
    let runtime_dir = tempfile::tempdir().expect("temp dir");
    // Both runs keep cubecl's kernel cache where camflow points it (`ml::gpu_kernel_cache`):
    // a tuned build's autotune results, none in a fixed-kernel build.
    let kernels = tempfile::tempdir().expect("temp dir");
    let run = |fuse: &str| {
        let p = Project::new(TWO_TRAININGS);
        let pipeline = p.pipeline();
        let cache = p.cache();
        let args =
            ["run", pipeline.to_str().unwrap(), "--backend", "wgpu", "--gpus", "1", "--fuse", fuse, "--cache-dir", cache.to_str().unwrap()];
        let r = Run {
            out: p
                .cmd(&args)
                .env("XDG_RUNTIME_DIR", runtime_dir.path())
                .env("CAMFLOW_KERNEL_CACHE", kernels.path())
                .env("CAMFLOW_KERNEL_LOG", runtime_dir.path().join("kernels.log"))
                .output()
                .expect("camflow runs"),
        };
        assert!(r.out.status.success(), "--fuse {fuse}:\nstdout:\n{}\nstderr:\n{}", r.stdout(), r.stderr());
        (r.stdout(), lock_of(&p))
    };
    let (fused_out, fused) = run("2");
    assert!(fused_out.lines().any(|l| l.starts_with("fused   2 instances in one task: train")), "the trainings did not fuse:\n{fused_out}");
    let (plain_out, plain) = run("off");
    assert!(!plain_out.contains("fused   "), "{plain_out}");
    let losses = |lock: &serde_yaml::Value, label: &str| -> Vec<f64> {
        let e = &lock["instances"][label]["metrics"]["epochs"];
        e.as_sequence().unwrap_or_else(|| panic!("{label}: no epochs")).iter().map(|x| x["loss"].as_f64().expect("loss")).collect()
    };
    let labels: Vec<String> = fused["instances"]
        .as_mapping()
        .expect("instances")
        .keys()
        .filter_map(|k| k.as_str())
        .filter(|l| l.starts_with("train"))
        .map(String::from)
        .collect();
    assert_eq!(labels.len(), 2, "{labels:?}");
    let (a, b) = (losses(&fused, &labels[0]), losses(&fused, &labels[1]));
    assert_ne!(a, b, "two seeds gave the same losses");
    for label in &labels {
        let (f, p) = (losses(&fused, label), losses(&plain, label));
        assert_eq!(f.len(), 2);
        for (x, y) in f.iter().zip(&p) {
            assert!(x.is_finite() && (x - y).abs() < 1e-3 * y.abs().max(1.0), "{label}: fused loss {x} vs alone {y}");
        }
    }
    // CAMFLOW_KERNEL_LOG got a line per kernel compiled and per shape tuned (gpu-check.sh counts
    // them to tell many compilations from slow ones).
    let log = std::fs::read_to_string(runtime_dir.path().join("kernels.log")).expect("CAMFLOW_KERNEL_LOG written");
    let count = |prefix: &str| log.lines().filter(|l| l.starts_with(prefix)).count();
    assert!(count("[Compiling kernel]") > 10, "{log}");
    let tuned: Vec<_> = files_under(kernels.path()).into_iter().filter(|f| f.to_string_lossy().ends_with(".json.log")).collect();
    if cfg!(feature = "gpu-tuned") {
        // The convolutions' autotune results were written under CAMFLOW_KERNEL_CACHE, for the
        // next process (a Slurm job, a rerun) to skip the tuning.
        assert!(tuned.iter().any(|f| f.to_string_lossy().contains("conv")), "no autotune results under CAMFLOW_KERNEL_CACHE: {tuned:?}");
        assert!(count("Fastest result") > 0, "{log}");
    } else {
        // A fixed-kernel build times no candidate kernels: nothing tuned, nothing kept of it.
        assert_eq!(count("Fastest result"), 0, "{log}");
        assert!(tuned.is_empty(), "autotune results from a fixed-kernel build: {tuned:?}");
    }
}


/// One model explained at two layers by two methods.
const FOUR_CAMS: &str = r#"name: cams-wgpu
seed: 5
stages:
  data:
    kind: data
    params: {source: synthetic, count: 24, image_size: 16, contrast: 0.8, slices_per_patient: 4}
  train:
    kind: train
    inputs: {data: data}
    params: {epochs: 1, batch_size: 8}
  cams:
    kind: gradcam
    inputs: {model: train, data: data}
    params: {batch_size: 5}
    sweep:
      grid:
        layer: [last, conv2]
        method: [gradcam, gradcam++]
"#;

/// A shared heatmap pass on a GPU-style backend (the segment-by-segment backward on cubecl
/// kernels): by default the four instances share one pass; forced again one by one, each
/// gives the same heatmaps up to the device's rounding, for the same trained model.
#[test]
fn wgpu_heatmaps_from_a_shared_pass_match_each_alone() {
    let runtime_dir = tempfile::tempdir().expect("temp dir");
    let p = Project::new(FOUR_CAMS);
    let shared = run_wgpu(&p, runtime_dir.path());
    assert!(shared.out.status.success(), "stdout:\n{}\nstderr:\n{}", shared.stdout(), shared.stderr());
    assert!(shared.stdout().lines().any(|l| l.starts_with("fused   4 instances in one task: cams")), "{}", shared.stdout());
    let labels: Vec<String> = ["last", "conv2"]
        .iter()
        .flat_map(|l| ["gradcam", "gradcam++"].map(|m| format!("cams[layer={l},method={m}]")))
        .collect();
    let maps = |p: &Project| -> Vec<Vec<f32>> {
        labels
            .iter()
            .map(|l| Planes::decode(&std::fs::read(p.object_of(l, "heatmaps.bin")).unwrap()).expect("heatmaps").data.concat())
            .collect()
    };
    let from_shared = maps(&p);
    let alone = run_wgpu_with(&p, runtime_dir.path(), &["--force", "cams", "--fuse", "off"]);
    assert!(alone.out.status.success(), "stdout:\n{}\nstderr:\n{}", alone.stdout(), alone.stderr());
    assert!(!alone.stdout().contains("fused   "), "{}", alone.stdout());
    assert_eq!(alone.summary("ran"), 4, "{}", alone.stdout());
    for ((label, a), b) in labels.iter().zip(&from_shared).zip(maps(&p)) {
        assert_eq!(a.len(), 24 * 16 * 16, "{label}");
        let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-3, "{label}: shared and alone differ by up to {worst}");
    }
    // Grad-CAM++ (weights never negative, so its maps are not all 0) at the two layers.
    assert!(from_shared[1] != from_shared[3], "two layers gave the same heatmaps");
    assert!(from_shared[1].iter().any(|&v| v > 0.5), "every Grad-CAM++ heatmap is flat");
}
