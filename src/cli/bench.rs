//! `camflow bench`: the benchmarks the issues name, run as a command (not timed tests).
//!
//! - `bench orch`: builds the paper-shaped sweep (train[a], gradcam[a], threshold[a,t],
//!   score[a,t], filter[a,m], retrain[a,m], score[a,m], plus the one data source) with the
//!   real stage kinds at the smallest size, runs it once, then times `camflow plan` and a
//!   no-op `camflow run` as separate processes, as a user would see them.
//! - `bench ml`: vgg-small at a given size and batch: one training step (forward, backward,
//!   Adam), inference images/s and Grad-CAM heatmaps/s on the chosen backend.
//! - `bench fuse`: groups of K vgg-small trainings (`ml::fused`), each model its own data and
//!   seed: per-model and total images/s, as ratios to K = 1 in the same run; with
//!   `--pipeline`, the pipeline run unfused and fused in two fresh caches.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::tensor::{Tensor, TensorData};
use clap::{Args, Subcommand};
use serde_json::json;

use super::print_out;
use crate::error::{Error, Result};
use crate::ml::backend::{BackendJob, BackendKind, dispatch};
use crate::ml::dataset::{Dataset, Sample, Split};
use crate::ml::fast_ops::TrainBackend;
use crate::ml::gradcam::{CamMethod, CamTarget, heatmaps};
use crate::ml::model::{ArchConfig, Classifier};
use crate::ml::rng::Rng;
use crate::ml::train::seeded_init;

#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: BenchWhat,
}

#[derive(Subcommand)]
enum BenchWhat {
    /// Planning and no-op reruns of the paper-shaped sweep DAG.
    Orch {
        /// Architectures (A), thresholds (T) and filter modes (M, at most 4), repeatable as
        /// A,T,M triples. Default: 2,9,4 (64 stages), 10,20,4 (540), 100,43,4 (10,000).
        #[arg(long = "shape", value_name = "A,T,M")]
        shapes: Vec<String>,
        /// Timed repetitions of each command (the median is reported).
        #[arg(long, default_value_t = 5)]
        reps: usize,
        /// Keep the generated projects here instead of a temporary folder.
        #[arg(long)]
        workdir: Option<std::path::PathBuf>,
    },
    /// Training step, inference and Grad-CAM throughput of vgg-small.
    Ml {
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 32)]
        batch: usize,
        #[arg(long, default_value_t = 1)]
        channels: usize,
        #[arg(long, default_value_t = 20)]
        reps: usize,
        #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda"])]
        backend: String,
    },
    /// Fused training (issue 10): per-model training throughput of groups of K vgg-small
    /// trainings, as ratios to K = 1 measured in the same run; with `--pipeline`, a pipeline's
    /// wall time fused and unfused (fresh temporary caches, both in this run).
    Fuse {
        /// Group sizes, e.g. 1,2,4,8 (K = 1 is always measured, for the ratios).
        #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
        k: Vec<usize>,
        /// Image sizes (repeatable).
        #[arg(long = "size", default_values_t = [32usize])]
        sizes: Vec<usize>,
        /// Training images per model (each model gets its own synthetic set of this size).
        #[arg(long, default_value_t = 256)]
        images: usize,
        #[arg(long, default_value_t = 1)]
        epochs: usize,
        #[arg(long, default_value_t = 32)]
        batch: usize,
        #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda"])]
        backend: String,
        /// Also run this pipeline twice per setting (`--fuse off` and `--fuse N`, N the
        /// largest K) in fresh caches, and time the whole run and a forced rerun of `--stage`.
        #[arg(long)]
        pipeline: Option<std::path::PathBuf>,
        /// The stage whose forced rerun is timed with `--pipeline`.
        #[arg(long, default_value = "retrain")]
        stage: String,
    },
}

pub fn bench(a: BenchArgs) -> Result<()> {
    match a.what {
        BenchWhat::Orch { shapes, reps, workdir } => orch(shapes, reps, workdir),
        BenchWhat::Ml { size, batch, channels, reps, backend } => ml(size, batch, channels, reps, &backend),
        BenchWhat::Fuse { k, sizes, images, epochs, batch, backend, pipeline, stage } => {
            let max = fuse_max(&k);
            fuse(FuseBench { k, sizes, images, epochs, batch }, &backend)?;
            match pipeline {
                Some(p) => fuse_pipeline(&p, &stage, max),
                None => Ok(()),
            }
        }
    }
}

/// The bench pipeline: `a` models (a seed axis stands in for architectures), `t` thresholds,
/// `m` filter modes; 16 images of 8x8 and zero epochs keep every stage in milliseconds.
pub fn sweep_yaml(a: usize, t: usize, m: usize) -> String {
    let seeds: Vec<String> = (1..=a).map(|i| i.to_string()).collect();
    let thr: Vec<String> = (1..=t).map(|i| format!("{}", i as f64 / (t + 1) as f64)).collect();
    let modes = ["multiply", "inverse", "mask", "inverse-mask"];
    format!(
        "name: bench\nseed: 1\nstages:\n  data:\n    kind: data\n    params: {{source: synthetic, count: 16, image_size: 8, slices_per_patient: 1}}\n  train:\n    kind: train\n    inputs: {{data: data}}\n    params: {{epochs: 0, batch_size: 16}}\n    resources: {{cpu: 1}}\n    sweep:\n      grid:\n        seed: [{}]\n  gradcam:\n    kind: gradcam\n    inputs: {{model: train, data: data}}\n    resources: {{cpu: 1}}\n  threshold:\n    kind: threshold\n    inputs: {{heatmaps: gradcam}}\n    sweep:\n      grid:\n        value: [{}]\n  score_seg:\n    kind: score\n    inputs: {{data: data, masks: threshold}}\n  filter:\n    kind: filter\n    inputs: {{data: data, heatmaps: gradcam}}\n    sweep:\n      grid:\n        mode: [{}]\n  retrain:\n    kind: retrain\n    inputs: {{data: filter}}\n    params: {{epochs: 0, batch_size: 16}}\n    resources: {{cpu: 1}}\n  score_cls:\n    kind: score\n    inputs: {{data: filter, model: retrain}}\n",
        seeds.join(", "),
        thr.join(", "),
        modes[..m.min(4)].join(", ")
    )
}

fn median_ms(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut v = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        f()?;
        v.push(t.elapsed().as_secs_f64() * 1e3);
    }
    v.sort_by(f64::total_cmp);
    Ok(v[v.len() / 2])
}

fn camflow(dir: &Path, args: &[&str]) -> Result<()> {
    let exe = std::env::current_exe().map_err(|e| Error::Io(format!("current exe: {e}")))?;
    let out = Command::new(exe)
        .current_dir(dir)
        .args(args)
        .env_remove("CAMFLOW_CACHE")
        .output()
        .map_err(|e| Error::Io(format!("spawn camflow: {e}")))?;
    if !out.status.success() {
        return Err(Error::Io(format!("camflow {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr))));
    }
    Ok(())
}

fn orch(shapes: Vec<String>, reps: usize, workdir: Option<std::path::PathBuf>) -> Result<()> {
    let shapes = if shapes.is_empty() { vec!["2,9,4".to_string(), "10,20,4".into(), "100,43,4".into()] } else { shapes };
    let tmp = tempfile::tempdir().map_err(|e| Error::Io(e.to_string()))?;
    let root = workdir.unwrap_or_else(|| tmp.path().to_path_buf());
    for s in shapes {
        let v: Vec<usize> = s.split(',').filter_map(|x| x.trim().parse().ok()).collect();
        let [a, t, m] = v[..] else { return Err(Error::Usage(format!("--shape {s}: expected A,T,M"))) };
        let dir = root.join(format!("a{a}-t{t}-m{m}"));
        std::fs::create_dir_all(&dir).map_err(|e| Error::Io(e.to_string()))?;
        std::fs::write(dir.join("sweep.yaml"), sweep_yaml(a, t, m)).map_err(|e| Error::Io(e.to_string()))?;
        let stages = a * (2 + 2 * t + 3 * m.min(4));
        let t0 = Instant::now();
        camflow(&dir, &["run", "sweep.yaml"])?;
        let first_s = t0.elapsed().as_secs_f64();
        let plan_ms = median_ms(reps, || camflow(&dir, &["plan", "sweep.yaml"]))?;
        let noop_ms = median_ms(reps, || camflow(&dir, &["run", "sweep.yaml"]))?;
        // One threshold value changes: its instances and their scores rerun.
        let changed = sweep_yaml(a, t, m).replacen(&format!("{}", 1.0 / (t + 1) as f64), "0.0123", 1);
        std::fs::write(dir.join("sweep.yaml"), changed).map_err(|e| Error::Io(e.to_string()))?;
        let change_ms = median_ms(1, || camflow(&dir, &["run", "sweep.yaml"]))?;
        print_out(&format!(
            "{}\n",
            json!({ "tool": format!("camflow {}", env!("CARGO_PKG_VERSION")), "stages": stages, "instances": stages + 1, "first_run_s": (first_s * 100.0).round() / 100.0, "plan_ms": (plan_ms * 10.0).round() / 10.0, "noop_ms": (noop_ms * 10.0).round() / 10.0, "threshold_change_ms": change_ms.round() })
        ));
    }
    Ok(())
}

struct MlJob {
    size: usize,
    batch: usize,
    channels: usize,
    reps: usize,
}

impl BackendJob for MlJob {
    type Output = serde_json::Value;
    fn run<B: TrainBackend>(self, device: B::Device) -> Self::Output {
        let (n, c, s) = (self.batch, self.channels, self.size);
        let arch = ArchConfig::vgg_small(c);
        let mut model = seeded_init::<B>(&arch, 0, &device);
        let mut rng = Rng::new(0);
        let x: Vec<f32> = (0..n * c * s * s).map(|_| rng.normal()).collect();
        let y: Vec<usize> = (0..n).map(|i| i % 2).collect();
        let xt = Tensor::<B, 4>::from_data(TensorData::new(x.clone(), [n, c, s, s]), &device);
        let mut optim = AdamConfig::new().init();
        // One step, timed in three parts (each part waits for its result, so on a GPU the
        // time is the work's, not the queue's): forward, backward, optimizer update.
        let mut parts = [0f64; 3];
        let mut step = |model: Classifier<B>, parts: &mut [f64; 3]| {
            let t = Instant::now();
            // The loss training uses (`ml::train`).
            let loss = B::cross_entropy(model.forward(xt.clone()), &y, None);
            let _ = loss.clone().into_data();
            let t1 = Instant::now();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            let t2 = Instant::now();
            let m = optim.step(1e-3, model, grads);
            let _ = m.fc.weight.val().into_data();
            let t3 = Instant::now();
            parts[0] += (t1 - t).as_secs_f64();
            parts[1] += (t2 - t1).as_secs_f64();
            parts[2] += (t3 - t2).as_secs_f64();
            m
        };
        let mut warm = [0f64; 3];
        for _ in 0..2 {
            model = step(model, &mut warm);
        }
        let t = Instant::now();
        for _ in 0..self.reps {
            model = step(model, &mut parts);
        }
        let step_ms = t.elapsed().as_secs_f64() * 1e3 / self.reps as f64;
        let part_ms = |i: usize| (parts[i] * 1e3 / self.reps as f64 * 100.0).round() / 100.0;
        let inner = model.valid();
        let xi = Tensor::<B::InnerBackend, 4>::from_data(TensorData::new(x.clone(), [n, c, s, s]), &device);
        let _ = inner.forward(xi.clone()).into_data();
        let t = Instant::now();
        for _ in 0..self.reps {
            let _ = inner.forward(xi.clone()).into_data();
        }
        let infer = (n * self.reps) as f64 / t.elapsed().as_secs_f64();
        let ds = Dataset {
            channels: c,
            height: s,
            width: s,
            samples: (0..n)
                .map(|i| Sample {
                    id: i.to_string(),
                    group: i.to_string(),
                    label: 1,
                    split: Split::Test,
                    image: x[i * c * s * s..(i + 1) * c * s * s].to_vec(),
                    mask: vec![0; s * s],
                })
                .collect(),
        };
        let idx: Vec<usize> = (0..n).collect();
        let _ = heatmaps(&model, &ds, &idx, 3, CamMethod::GradCam, CamTarget::Class(1), n);
        let cam_reps = (self.reps / 4).max(3);
        let t = Instant::now();
        for _ in 0..cam_reps {
            let _ = heatmaps(&model, &ds, &idx, 3, CamMethod::GradCam, CamTarget::Class(1), n);
        }
        let cams = (n * cam_reps) as f64 / t.elapsed().as_secs_f64();
        json!({ "size": s, "batch": n, "channels": c, "train_step_ms": (step_ms * 100.0).round() / 100.0, "forward_ms": part_ms(0), "backward_ms": part_ms(1), "optimizer_ms": part_ms(2), "infer_images_per_s": infer.round(), "gradcam_heatmaps_per_s": cams.round() })
    }
}

fn ml(size: usize, batch: usize, channels: usize, reps: usize, backend: &str) -> Result<()> {
    let kind = BackendKind::parse(backend).ok_or_else(|| Error::Usage(format!("unknown backend {backend}")))?;
    let mut out = dispatch(kind, 0, MlJob { size, batch, channels, reps }).map_err(|e| Error::Usage(e.to_string()))?;
    out["tool"] = json!(format!("camflow {} (burn 0.21, {})", env!("CARGO_PKG_VERSION"), kind.class()));
    out["threads"] = json!(std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    if kind == BackendKind::Cpu {
        out["cpu_kernels"] = json!(crate::ml::cpu_kernels::portable_gemm::active_level().name());
    }
    print_out(&format!("{out}\n"));
    Ok(())
}

struct FuseBench {
    k: Vec<usize>,
    sizes: Vec<usize>,
    images: usize,
    epochs: usize,
    batch: usize,
}

/// The largest group asked for (at least 2, or nothing would fuse).
fn fuse_max(k: &[usize]) -> usize {
    k.iter().copied().max().unwrap_or(2).max(2)
}

impl BackendJob for &FuseBench {
    type Output = Vec<serde_json::Value>;
    fn run<B: TrainBackend>(self, device: B::Device) -> Self::Output {
        use crate::ml::dataset::{SplitConfig, assign_splits};
        use crate::ml::fused::{Member, train_group};
        use crate::ml::synthetic::{SyntheticConfig, generate};
        use crate::ml::train::{ClassWeights, OptimizerKind, TrainConfig};
        let mut ks: Vec<usize> = self.k.iter().copied().filter(|&k| k > 0).collect();
        ks.push(1);
        ks.sort_unstable();
        ks.dedup();
        let mut rows = Vec::new();
        for &size in &self.sizes {
            let kmax = ks.last().copied().unwrap_or(1);
            // Every model its own data and seed, as the members of a retrain group have.
            let data: Vec<Dataset> = (0..kmax)
                .map(|i| {
                    let cfg = SyntheticConfig { count: self.images, size, tumor_fraction: 0.5, contrast: 0.5, noise: 0.1, slices_per_patient: 1, seed: i as u64 + 1 };
                    let mut ds = generate(&cfg);
                    assign_splits(&mut ds.samples, SplitConfig { val: 0.0, test: 0.0, seed: 1 });
                    ds
                })
                .collect();
            let cfgs: Vec<TrainConfig> = (0..kmax)
                .map(|i| TrainConfig {
                    arch: ArchConfig::vgg_small(1),
                    optimizer: OptimizerKind::Adam,
                    lr: 1e-3,
                    weight_decay: 0.0,
                    momentum: 0.0,
                    epochs: self.epochs,
                    batch_size: self.batch,
                    class_weights: ClassWeights::Balanced,
                    flip: true,
                    seed: i as u64 + 1,
                })
                .collect();
            let mut base = None;
            for &k in &ks {
                let members: Vec<Member> = cfgs.iter().zip(&data).take(k).map(|(cfg, ds)| Member { cfg, ds }).collect();
                let t = Instant::now();
                let ok = train_group::<B, _>(&members, &device, &|_, _| {}, &|_, r| r.is_ok());
                let secs = t.elapsed().as_secs_f64();
                let per_model = (self.images * self.epochs) as f64 / secs;
                let base_rate = *base.get_or_insert(per_model);
                rows.push(json!({
                    "size": size, "k": k, "seconds": (secs * 100.0).round() / 100.0,
                    "images_per_s_per_model": per_model.round(), "images_per_s_total": (per_model * k as f64).round(),
                    "total_vs_k1": ((per_model * k as f64 / base_rate) * 100.0).round() / 100.0,
                    "trained": ok.iter().filter(|&&o| o).count(),
                }));
            }
        }
        rows
    }
}

fn fuse(b: FuseBench, backend: &str) -> Result<()> {
    let kind = BackendKind::parse(backend).ok_or_else(|| Error::Usage(format!("unknown backend {backend}")))?;
    if b.sizes.contains(&0) || b.sizes.iter().any(|s| s % 8 != 0) || b.images == 0 || b.batch == 0 {
        return Err(Error::Usage("bench fuse: --size must be a positive multiple of 8, --images and --batch positive".into()));
    }
    let rows = dispatch(kind, 0, &b).map_err(|e| Error::Usage(e.to_string()))?;
    let tool = format!("camflow {} (burn 0.21, {})", env!("CARGO_PKG_VERSION"), kind.class());
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    for mut r in rows {
        r["tool"] = json!(tool);
        r["threads"] = json!(threads);
        print_out(&format!("{r}\n"));
    }
    Ok(())
}

/// The pipeline run in two fresh caches, `--fuse off` and `--fuse max`: the whole run's wall
/// time, then a forced rerun of `stage` (its downstream stays cached: same bytes).
fn fuse_pipeline(pipeline: &Path, stage: &str, max: usize) -> Result<()> {
    let src = std::fs::read_to_string(pipeline).map_err(|e| Error::Usage(format!("{}: {e}", pipeline.display())))?;
    let tmp = tempfile::tempdir().map_err(|e| Error::Io(e.to_string()))?;
    let mut row = json!({ "pipeline": pipeline.display().to_string(), "stage": stage, "fuse": max });
    for setting in ["off".to_string(), max.to_string()] {
        let dir = tmp.path().join(format!("fuse-{setting}"));
        std::fs::create_dir_all(&dir).map_err(|e| Error::Io(e.to_string()))?;
        std::fs::write(dir.join("p.yaml"), &src).map_err(|e| Error::Io(e.to_string()))?;
        let t = Instant::now();
        camflow(&dir, &["run", "p.yaml", "--fuse", &setting])?;
        let whole = t.elapsed().as_secs_f64();
        let t = Instant::now();
        camflow(&dir, &["run", "p.yaml", "--fuse", &setting, "--force", stage])?;
        let forced = t.elapsed().as_secs_f64();
        let lock = std::fs::read(dir.join("p.lock.yaml")).map_err(|e| Error::Io(e.to_string()))?;
        row[format!("run_s_fuse_{setting}")] = json!((whole * 100.0).round() / 100.0);
        row[format!("{stage}_s_fuse_{setting}")] = json!((forced * 100.0).round() / 100.0);
        row[format!("lock_sha256_fuse_{setting}")] = json!(crate::cache::key::sha256_hex(&lock));
    }
    let ratio = |row: &serde_json::Value, a: &str, b: &str| {
        let (x, y) = (row[a].as_f64().unwrap_or(f64::NAN), row[b].as_f64().unwrap_or(f64::NAN));
        json!(((x / y) * 100.0).round() / 100.0)
    };
    row["run_speedup"] = ratio(&row, "run_s_fuse_off", &format!("run_s_fuse_{max}"));
    row[format!("{stage}_speedup")] = ratio(&row, &format!("{stage}_s_fuse_off"), &format!("{stage}_s_fuse_{max}"));
    row["locks_identical"] = json!(row["lock_sha256_fuse_off"] == row[format!("lock_sha256_fuse_{max}")]);
    print_out(&format!("{row}\n"));
    Ok(())
}
