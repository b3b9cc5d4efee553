//! `camflow bench`: the benchmarks the issues name, run as a command (not timed tests).
//!
//! - `bench orch`: builds the paper-shaped sweep (train[a], gradcam[a], threshold[a,t],
//!   score[a,t], filter[a,m], retrain[a,m], score[a,m], plus the one data source) with the
//!   real stage kinds at the smallest size, runs it once, then times `camflow plan` and a
//!   no-op `camflow run` as separate processes, as a user would see them, with each one's
//!   peak memory. `--instances N` does the same on a generated study of N instances (the one
//!   of scripts/plan-scale.sh) and prints PASS/MISS against issue 9's targets.
//! - `bench ml`: vgg-small at a given size and batch: one training step (forward, backward,
//!   Adam), inference images/s and Grad-CAM heatmaps/s on the chosen backend, and heatmaps of
//!   three methods (at one layer, then at three layers) one pass each against one shared
//!   pass (the ratio, measured together).
//! - `bench fuse`: groups of K vgg-small trainings (`ml::fused`), each model its own data and
//!   seed: per-model and total images/s, as ratios to K = 1 in the same run; with
//!   `--pipeline`, the pipeline run with and without stacks (`--fuse 1` and `--fuse N`) in
//!   two fresh caches.

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
use crate::ml::gradcam::{CamMethod, CamTarget, heatmaps, heatmaps_for};
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
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
        reps: u32,
        /// Keep the generated projects here instead of a temporary folder.
        #[arg(long)]
        workdir: Option<std::path::PathBuf>,
        /// Instead of shapes: a generated study of at least N instances (data, N/10 trainings,
        /// their Grad-CAMs, 8 thresholds each; like scripts/plan-scale.sh), repeatable. Planned on
        /// a fresh cache; run once, planned again and rerun as a no-op when N <= --run-max.
        /// Prints PASS/MISS against the targets.
        #[arg(long = "instances", value_name = "N")]
        instances: Vec<usize>,
        /// The largest generated study that is run (a first run of 100,000 instances takes long).
        #[arg(long, default_value_t = 20_000)]
        run_max: usize,
    },
    /// Training step, inference and Grad-CAM throughput of vgg-small (and heatmaps of three
    /// methods at one layer and at three layers, from one shared pass against one pass each).
    Ml {
        /// Image size, as a data stage's `image_size` (16 to 1024: vgg-small pools four times).
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(16..=1024))]
        size: u32,
        #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
        batch: u32,
        /// Image channels (1: grey, 3: RGB).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4))]
        channels: u32,
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        reps: u32,
        #[arg(long, default_value = "cpu", value_parser = clap::builder::PossibleValuesParser::new(crate::ml::backend::NAMES))]
        backend: String,
    },
    /// Fused training (issue 10): per-model training throughput of groups of K vgg-small
    /// trainings, as ratios to K = 1 measured in the same run; with `--pipeline`, a pipeline's
    /// wall time with and without stacked trainings (fresh temporary caches, both in this run).
    Fuse {
        /// Group sizes, e.g. 1,2,4,8 (K = 1 is always measured, for the ratios; at most 64).
        #[arg(long, value_delimiter = ',', default_value = "1,2,4,8", value_parser = clap::value_parser!(u32).range(1..=64))]
        k: Vec<u32>,
        /// Image sizes (repeatable; 16 to 1024).
        #[arg(long = "size", default_values_t = [32u32], value_parser = clap::value_parser!(u32).range(16..=1024))]
        sizes: Vec<u32>,
        /// Training images per model (each model gets its own synthetic set of this size).
        #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        images: u32,
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
        epochs: u32,
        #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
        batch: u32,
        #[arg(long, default_value = "cpu", value_parser = clap::builder::PossibleValuesParser::new(crate::ml::backend::NAMES))]
        backend: String,
        /// Also run this pipeline twice per setting (`--fuse 1` and `--fuse N`, N the
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
        BenchWhat::Orch { shapes, reps, workdir, instances, run_max } => {
            let tmp = tempfile::tempdir().map_err(|e| Error::Io(e.to_string()))?;
            let root = workdir.unwrap_or_else(|| tmp.path().to_path_buf());
            let reps = reps as usize;
            if instances.is_empty() { orch(shapes, reps, &root) } else { orch_scale(&instances, reps, run_max, &root) }
        }
        BenchWhat::Ml { size, batch, channels, reps, backend } => ml(size as usize, batch as usize, channels as usize, reps as usize, &backend),
        BenchWhat::Fuse { k, sizes, images, epochs, batch, backend, pipeline, stage } => {
            let k: Vec<usize> = k.into_iter().map(|k| k as usize).collect();
            let sizes: Vec<usize> = sizes.into_iter().map(|s| s as usize).collect();
            let max = fuse_max(&k);
            let (images, epochs, batch) = (images as usize, epochs as usize, batch as usize);
            // The pipeline is checked before anything is timed.
            let sets = pipeline.as_deref().map(|p| pipeline_sets(p, &stage)).transpose()?;
            fuse(FuseBench { k, sizes, images, epochs, batch, tool: String::new() }, &backend)?;
            match (pipeline, sets) {
                (Some(p), Some(sets)) => fuse_pipeline(&p, &stage, max, &sets),
                _ => Ok(()),
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

/// The study of `scripts/plan-scale.sh`, sized: one data source, `trainings` models (a seed
/// axis), one Grad-CAM each and 8 thresholds of each: `1 + 10 * trainings` instances. Tiny
/// data and zero epochs, so that a study of 10,000 instances also runs in about a minute.
pub fn scale_yaml(trainings: usize) -> String {
    let seeds: Vec<String> = (1..=trainings).map(|i| i.to_string()).collect();
    format!(
        "name: scale\nseed: 1\nstages:\n  data:\n    kind: data\n    params: {{source: synthetic, count: 16, image_size: 8, slices_per_patient: 1}}\n  train:\n    kind: train\n    inputs: {{data: data}}\n    params: {{epochs: 0, batch_size: 16}}\n    resources: {{cpu: 1}}\n    sweep:\n      grid:\n        seed: [{}]\n  cams:\n    kind: gradcam\n    inputs: {{model: train, data: data}}\n    resources: {{cpu: 1}}\n  masks:\n    kind: threshold\n    inputs: {{heatmaps: cams}}\n    sweep:\n      grid:\n        value: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]\n",
        seeds.join(", ")
    )
}

/// Trainings of the [`scale_yaml`] study with at least `n` instances, and its instance count.
pub fn scale_size(n: usize) -> (usize, usize) {
    let trainings = n.saturating_sub(1).div_ceil(10).max(1);
    (trainings, 1 + 10 * trainings)
}

/// The targets (issue 9, "Scale of the orchestrator itself").
const NOOP_TARGET: (usize, f64) = (10_000, 100.0);
const PLAN_TARGET: (usize, f64, f64) = (100_000, 1_000.0, 500.0);

/// Wall time of one command, its CPU time (user + system) and its peak resident memory (MB),
/// the last two when the OS reports them. CPU time says what the command costs when other
/// work shares the machine and stretches its wall time.
#[derive(Clone, Copy)]
struct Timed {
    ms: f64,
    cpu_ms: Option<f64>,
    peak_mb: Option<f64>,
}

/// Median wall time of `reps` runs, and the largest peak memory of them.
fn median_timed(reps: usize, mut f: impl FnMut() -> Result<Timed>) -> Result<Timed> {
    let mut v = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        v.push(f()?);
    }
    let peak_mb = v.iter().filter_map(|t| t.peak_mb).reduce(f64::max);
    let mut cpu: Vec<f64> = v.iter().filter_map(|t| t.cpu_ms).collect();
    cpu.sort_by(f64::total_cmp);
    let cpu_ms = cpu.get(cpu.len() / 2).copied();
    v.sort_by(|a, b| a.ms.total_cmp(&b.ms));
    Ok(Timed { ms: v[v.len() / 2].ms, cpu_ms, peak_mb })
}

/// Runs `camflow args` in `dir` as a user would (a separate process, stdout discarded), timed,
/// with its peak memory from the kernel's accounting of that child (`wait4`).
fn camflow(dir: &Path, args: &[&str]) -> Result<Timed> {
    use std::io::Read;
    let exe = std::env::current_exe().map_err(|e| Error::Io(format!("current exe: {e}")))?;
    let started = Instant::now();
    let mut child = Command::new(exe)
        .current_dir(dir)
        .args(args)
        .env_remove("CAMFLOW_CACHE")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| Error::Io(format!("spawn camflow: {e}")))?;
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    let (ok, cpu_ms, peak_mb) = wait_with_usage(child)?;
    let ms = started.elapsed().as_secs_f64() * 1e3;
    if !ok {
        return Err(Error::Io(format!("camflow {} failed: {stderr}", args.join(" "))));
    }
    Ok(Timed { ms, cpu_ms, peak_mb })
}

/// Waits for `child`: whether it succeeded, its CPU time in ms and its peak resident set in
/// MB (`ru_maxrss`).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn wait_with_usage(child: std::process::Child) -> Result<(bool, Option<f64>, Option<f64>)> {
    let pid = child.id() as libc::pid_t;
    let mut status: libc::c_int = 0;
    // SAFETY: an all-zero rusage is a valid value; wait4 fills it in for our own child, which
    // `std` has not reaped (we never call `wait` on it).
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: valid pointers to locals; `pid` is our child.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if r == pid {
            break;
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(Error::Io(format!("waiting for camflow: {err}")));
        }
    }
    let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    let ms = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
    // Linux reports ru_maxrss in KiB.
    Ok((ok, Some(ms(usage.ru_utime) + ms(usage.ru_stime)), Some(usage.ru_maxrss as f64 / 1024.0)))
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn wait_with_usage(mut child: std::process::Child) -> Result<(bool, Option<f64>, Option<f64>)> {
    let st = child.wait().map_err(|e| Error::Io(format!("waiting for camflow: {e}")))?;
    Ok((st.success(), None, None))
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn peak_json(t: Timed) -> serde_json::Value {
    t.peak_mb.map(|m| json!(round1(m))).unwrap_or(serde_json::Value::Null)
}

fn cpu_json(t: Timed) -> serde_json::Value {
    t.cpu_ms.map(|m| json!(round1(m))).unwrap_or(serde_json::Value::Null)
}

/// ` (CPU 41.0 ms)`: what the command cost, whatever else shared the machine.
fn cpu_note(t: Timed) -> String {
    t.cpu_ms.map(|c| format!(" (CPU {c:.1} ms)")).unwrap_or_default()
}

/// `PASS`/`MISS` lines for the targets (judged on wall time, as a user sees it) a measurement of `instances` instances covers.
fn target_lines(instances: usize, plan_fresh: Option<Timed>, noop: Option<Timed>) -> String {
    let mut s = String::new();
    let verdict = |ok: bool| if ok { "PASS" } else { "MISS" };
    if let Some(n) = noop
        && instances >= NOOP_TARGET.0
    {
        s.push_str(&format!(
            "{} no-op rerun of {instances} instances: {:.1} ms{} (target < {} ms at {})\n",
            verdict(n.ms < NOOP_TARGET.1),
            n.ms,
            cpu_note(n),
            NOOP_TARGET.1,
            NOOP_TARGET.0
        ));
    }
    if let Some(p) = plan_fresh
        && instances >= PLAN_TARGET.0
    {
        let mem_ok = p.peak_mb.is_some_and(|m| m < PLAN_TARGET.2);
        let mem = p.peak_mb.map(|m| format!("{m:.0} MB")).unwrap_or_else(|| "memory not measured".into());
        s.push_str(&format!(
            "{} plan of {instances} instances: {:.0} ms{}, {mem} (target < {} ms and < {} MB at {})\n",
            verdict(p.ms < PLAN_TARGET.1 && mem_ok),
            p.ms,
            cpu_note(p),
            PLAN_TARGET.1,
            PLAN_TARGET.2,
            PLAN_TARGET.0
        ));
    }
    s
}

fn write_spec(dir: &Path, yaml: &str) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::Io(format!("{}: {e}", dir.display())))?;
    std::fs::write(dir.join("sweep.yaml"), yaml).map_err(|e| Error::Io(format!("{}: {e}", dir.display())))
}

/// `A,T,M`: architectures and thresholds of at least 1, filter modes 1 to 4.
fn parse_shape(s: &str) -> std::result::Result<(usize, usize, usize), String> {
    let v: Vec<usize> = s.split(',').map(|x| x.trim().parse::<usize>().map_err(|_| format!("`{x}` is not a count"))).collect::<std::result::Result<_, _>>()?;
    match v[..] {
        [a, t, m] if a >= 1 && t >= 1 && (1..=4).contains(&m) && a <= 100_000 && t <= 1_000 => Ok((a, t, m)),
        [_, _, _] => Err("expected A >= 1 (at most 100000), T >= 1 (at most 1000) and M from 1 to 4 (the filter modes)".into()),
        _ => Err("expected three counts A,T,M, e.g. 2,9,4".into()),
    }
}

fn orch(shapes: Vec<String>, reps: usize, root: &Path) -> Result<()> {
    let shapes = if shapes.is_empty() { vec!["2,9,4".to_string(), "10,20,4".into(), "100,43,4".into()] } else { shapes };
    for s in shapes {
        let (a, t, m) = parse_shape(&s).map_err(|e| Error::Usage(format!("--shape {s}: {e}")))?;
        let dir = root.join(format!("a{a}-t{t}-m{m}"));
        write_spec(&dir, &sweep_yaml(a, t, m))?;
        let stages = a * (2 + 2 * t + 3 * m);
        let first = camflow(&dir, &["run", "sweep.yaml"])?;
        let plan = median_timed(reps, || camflow(&dir, &["plan", "sweep.yaml"]))?;
        // As `--instances` does: the first rerun within `cache::verified::SETTLED` of the run
        // that wrote the records checks them in full; the no-op a user sees later comes after.
        std::thread::sleep(crate::cache::verified::SETTLED + std::time::Duration::from_millis(500));
        let first_noop = camflow(&dir, &["run", "sweep.yaml"])?;
        let noop = median_timed(reps, || camflow(&dir, &["run", "sweep.yaml"]))?;
        // One threshold value changes: its instances and their scores rerun.
        let changed = sweep_yaml(a, t, m).replacen(&format!("{}", 1.0 / (t + 1) as f64), "0.0123", 1);
        write_spec(&dir, &changed)?;
        let change = camflow(&dir, &["run", "sweep.yaml"])?;
        print_out(&format!(
            "{}\n",
            json!({ "tool": format!("camflow {}", env!("CARGO_PKG_VERSION")), "stages": stages, "instances": stages + 1, "first_run_s": (first.ms / 10.0).round() / 100.0, "first_noop_ms": round1(first_noop.ms), "plan_ms": round1(plan.ms), "plan_cpu_ms": cpu_json(plan), "plan_peak_mb": peak_json(plan), "noop_ms": round1(noop.ms), "noop_cpu_ms": cpu_json(noop), "noop_peak_mb": peak_json(noop), "threshold_change_ms": change.ms.round() })
        ));
        print_out(&target_lines(stages + 1, None, Some(noop)));
    }
    Ok(())
}

/// `--instances N`: the generated study of at least N instances.
fn orch_scale(sizes: &[usize], reps: usize, run_max: usize, root: &Path) -> Result<()> {
    for &n in sizes {
        let (trainings, instances) = scale_size(n);
        let dir = root.join(format!("scale-{instances}"));
        write_spec(&dir, &scale_yaml(trainings))?;
        // On a fresh cache, as scripts/plan-scale.sh measures it: every cache folder is new.
        let plan_fresh = median_timed(reps, || {
            let _ = std::fs::remove_dir_all(dir.join("cache"));
            camflow(&dir, &["plan", "sweep.yaml"])
        })?;
        let mut row = json!({ "tool": format!("camflow {}", env!("CARGO_PKG_VERSION")), "instances": instances, "plan_fresh_ms": round1(plan_fresh.ms), "plan_fresh_cpu_ms": cpu_json(plan_fresh), "plan_fresh_peak_mb": peak_json(plan_fresh) });
        let mut noop = None;
        if instances <= run_max {
            let first = camflow(&dir, &["run", "sweep.yaml"])?;
            let plan = median_timed(reps, || camflow(&dir, &["plan", "sweep.yaml"]))?;
            // A rerun within `cache::verified::SETTLED` of the run that wrote the records (and
            // the lock) checks them in full and rebuilds the lock: that first no-op is reported
            // on its own; `noop_ms` is the no-op a user sees later, nothing having changed.
            std::thread::sleep(crate::cache::verified::SETTLED + std::time::Duration::from_millis(500));
            let settling = camflow(&dir, &["run", "sweep.yaml"])?;
            let n = median_timed(reps, || camflow(&dir, &["run", "sweep.yaml"]))?;
            row["first_run_s"] = json!((first.ms / 10.0).round() / 100.0);
            row["first_noop_ms"] = json!(round1(settling.ms));
            row["plan_ms"] = json!(round1(plan.ms));
            row["plan_cpu_ms"] = cpu_json(plan);
            row["plan_peak_mb"] = peak_json(plan);
            row["noop_ms"] = json!(round1(n.ms));
            row["noop_cpu_ms"] = cpu_json(n);
            row["noop_peak_mb"] = peak_json(n);
            noop = Some(n);
        }
        print_out(&format!("{row}\n"));
        print_out(&target_lines(instances, Some(plan_fresh), noop));
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
        // Several (layer, method) requests of one model: one pass each (as `--fuse off` runs
        // them) against one shared pass (the default: `stages::gradcam`), in this run.
        let methods = [CamMethod::GradCam, CamMethod::GradCamPlusPlus, CamMethod::HiResCam];
        // Timed apart, shared, shared, apart, so that a drift of this machine's speed weighs on
        // both alike.
        let shared_vs_apart = |requests: &[(usize, CamMethod)]| {
            let time_apart = || {
                let t = Instant::now();
                for _ in 0..cam_reps {
                    for &(layer, m) in requests {
                        let _ = heatmaps(&model, &ds, &idx, layer, m, CamTarget::Class(1), n);
                    }
                }
                t.elapsed().as_secs_f64()
            };
            let time_shared = || {
                let t = Instant::now();
                for _ in 0..cam_reps {
                    let _ = heatmaps_for(&model, &ds, &idx, requests, CamTarget::Class(1), n, &mut |_, _| {});
                }
                t.elapsed().as_secs_f64()
            };
            let mut apart = time_apart();
            let mut shared = time_shared();
            shared += time_shared();
            apart += time_apart();
            let per_s = |secs: f64| ((requests.len() * n * cam_reps * 2) as f64 / secs).round();
            (per_s(apart), per_s(shared), (apart / shared * 100.0).round() / 100.0)
        };
        let three: Vec<(usize, CamMethod)> = methods.iter().map(|&m| (3, m)).collect();
        let nine: Vec<(usize, CamMethod)> = (1..=3).flat_map(|l| methods.iter().map(move |&m| (l, m))).collect();
        let (three_apart, three_shared, three_speedup) = shared_vs_apart(&three);
        let (nine_apart, nine_shared, nine_speedup) = shared_vs_apart(&nine);
        json!({ "size": s, "batch": n, "channels": c, "warmup_s": ((warm.iter().sum::<f64>()) * 100.0).round() / 100.0, "train_step_ms": (step_ms * 100.0).round() / 100.0, "forward_ms": part_ms(0), "backward_ms": part_ms(1), "optimizer_ms": part_ms(2), "infer_images_per_s": infer.round(), "gradcam_heatmaps_per_s": cams.round(), "three_methods_apart_heatmaps_per_s": three_apart, "three_methods_shared_heatmaps_per_s": three_shared, "three_methods_shared_speedup": three_speedup, "three_layers_x_three_methods_apart_heatmaps_per_s": nine_apart, "three_layers_x_three_methods_shared_heatmaps_per_s": nine_shared, "three_layers_x_three_methods_shared_speedup": nine_speedup })
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
    /// Printed beside each row: which camflow, backend and thread count measured it.
    tool: String,
}

/// The largest group asked for (at least 2, or nothing would fuse).
fn fuse_max(k: &[usize]) -> usize {
    k.iter().copied().max().unwrap_or(2).max(2)
}

impl BackendJob for &FuseBench {
    /// Rows are printed as they are measured (a GPU's first use of a shape can take minutes of
    /// kernel compilation: a run stopped by a time limit keeps the rows it finished).
    type Output = ();
    fn run<B: TrainBackend>(self, device: B::Device) -> Self::Output {
        use crate::ml::dataset::{SplitConfig, assign_splits};
        use crate::ml::fused::{Member, train_group};
        use crate::ml::synthetic::{SyntheticConfig, generate};
        use crate::ml::train::{ClassWeights, OptimizerKind, TrainConfig};
        let mut ks: Vec<usize> = self.k.iter().copied().filter(|&k| k > 0).collect();
        ks.push(1);
        ks.sort_unstable();
        ks.dedup();
        let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        for &size in &self.sizes {
            let kmax = ks.last().copied().unwrap_or(1);
            // Every model its own data and seed, as the members of a retrain group have.
            let data: Vec<Dataset> = (0..kmax)
                .map(|i| {
                    let cfg = SyntheticConfig {
                        count: self.images,
                        size,
                        tumor_fraction: 0.5,
                        contrast: 0.5,
                        noise: 0.1,
                        slices_per_patient: 1,
                        seed: i as u64 + 1,
                    };
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
            // A little of each model's data, for an untimed warm-up of each K: a GPU backend
            // compiles (a tuned build: and autotunes) its kernels on the first use of a shape, which would
            // otherwise be charged to whichever K meets that shape first (K = 1 above all).
            // Two full batches, or one and the last partial batch's size: every batch shape.
            let rem = self.images % self.batch;
            let warm_n = if rem == 0 { self.batch.saturating_mul(2) } else { self.batch.saturating_add(rem) }.min(self.images);
            let warm_data: Vec<Dataset> = data
                .iter()
                .map(|ds| Dataset {
                    channels: ds.channels,
                    height: ds.height,
                    width: ds.width,
                    samples: ds.samples.iter().take(warm_n).cloned().collect(),
                })
                .collect();
            let mut base = None;
            for &k in &ks {
                let warm: Vec<Member> = cfgs.iter().zip(&warm_data).take(k).map(|(cfg, ds)| Member { cfg, ds }).collect();
                let t = Instant::now();
                let _ = train_group::<B, _>(&warm, &device, &|_, _| {}, &|_, r| r.is_ok());
                let warmup = t.elapsed().as_secs_f64();
                let members: Vec<Member> = cfgs.iter().zip(&data).take(k).map(|(cfg, ds)| Member { cfg, ds }).collect();
                let (t, cpu0) = (Instant::now(), process_cpu_seconds());
                let ok = train_group::<B, _>(&members, &device, &|_, _| {}, &|_, r| r.is_ok());
                let secs = t.elapsed().as_secs_f64();
                let cores_busy = process_cpu_seconds().zip(cpu0).map(|(b, a)| ((b - a) / secs * 100.0).round() / 100.0);
                let per_model = (self.images * self.epochs) as f64 / secs;
                let base_rate = *base.get_or_insert(per_model);
                let row = json!({
                    "size": size, "k": k, "seconds": (secs * 100.0).round() / 100.0,
                    "warmup_s": (warmup * 100.0).round() / 100.0,
                    "images_per_s_per_model": per_model.round(), "images_per_s_total": (per_model * k as f64).round(),
                    "total_vs_k1": ((per_model * k as f64 / base_rate) * 100.0).round() / 100.0,
                    "trained": ok.iter().filter(|&&o| o).count(),
                    "stacks": crate::ml::fused::stacks(&members, B::stack_budget()).len(),
                    "cores_busy": cores_busy,
                    "tool": self.tool, "threads": threads,
                });
                print_out(&format!("{row}\n"));
            }
        }
    }
}

/// CPU time (user + system) of this process so far, in seconds: divided by wall time, how many
/// cores a training kept busy (the ceiling of what running trainings side by side can add).
fn process_cpu_seconds() -> Option<f64> {
    // SAFETY: an all-zero rusage is a valid value, which getrusage fills in for this process.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a pointer to a live rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return None;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Some(secs(usage.ru_utime) + secs(usage.ru_stime))
}

fn fuse(mut b: FuseBench, backend: &str) -> Result<()> {
    let kind = BackendKind::parse(backend).ok_or_else(|| Error::Usage(format!("unknown backend {backend}")))?;
    if b.sizes.contains(&0) || b.sizes.iter().any(|s| s % 8 != 0) || b.images == 0 || b.batch == 0 {
        return Err(Error::Usage("bench fuse: --size must be a positive multiple of 8, --images and --batch positive".into()));
    }
    b.tool = format!("camflow {} (burn 0.21, {})", env!("CARGO_PKG_VERSION"), kind.class());
    dispatch(kind, 0, &b).map_err(|e| Error::Usage(e.to_string()))
}

/// The pipeline run in two fresh caches, `--fuse 1` (no stacks; shared heatmap passes on in
/// both, so the ratio is the stacks' alone) and `--fuse max`: the whole run's wall time, then
/// a forced rerun of `stage` (its downstream stays cached: same bytes).
/// Checks `--pipeline`'s spec and `--stage`, and returns the `--set`s that keep its data where
/// it is: the spec runs from a temporary folder (its lock must not overwrite the user's), so
/// each relative location param (a data `root`) is given back absolute.
fn pipeline_sets(pipeline: &Path, stage: &str) -> Result<Vec<String>> {
    let catalog = crate::stages::catalog();
    let spec = crate::spec::load(pipeline, &[], &catalog)?;
    if !spec.stages.contains_key(stage) {
        let names: Vec<&str> = spec.stages.keys().map(String::as_str).collect();
        return Err(Error::Usage(format!("--stage {stage}: no such stage in {} (stages: {})", pipeline.display(), names.join(", "))));
    }
    let base = std::fs::canonicalize(&spec.base_dir).unwrap_or_else(|_| spec.base_dir.clone());
    let mut sets: Vec<String> = Vec::new();
    for (name, st) in &spec.stages {
        let Some(kind) = catalog.get(&st.kind) else { continue };
        for &lp in kind.location_params() {
            let value = st.params.get(lp).or_else(|| spec.defaults.get(&st.kind).and_then(|d| d.get(lp)));
            if let Some(serde_json::Value::String(v)) = value
                && Path::new(v).is_relative()
            {
                sets.push(format!("stages.{name}.params.{lp}={}", base.join(v).display()));
            }
        }
    }
    Ok(sets)
}

fn fuse_pipeline(pipeline: &Path, stage: &str, max: usize, sets: &[String]) -> Result<()> {
    let src = std::fs::read_to_string(pipeline).map_err(|e| Error::Usage(format!("{}: {e}", pipeline.display())))?;
    let tmp = tempfile::tempdir().map_err(|e| Error::Io(e.to_string()))?;
    let mut row = json!({ "pipeline": pipeline.display().to_string(), "stage": stage, "fuse": max });
    for setting in ["1".to_string(), max.to_string()] {
        let dir = tmp.path().join(format!("fuse-{setting}"));
        std::fs::create_dir_all(&dir).map_err(|e| Error::Io(e.to_string()))?;
        std::fs::write(dir.join("p.yaml"), &src).map_err(|e| Error::Io(e.to_string()))?;
        let mut args: Vec<&str> = vec!["run", "p.yaml", "--fuse", &setting];
        for set in sets {
            args.extend(["--set", set.as_str()]);
        }
        let t = Instant::now();
        camflow(&dir, &args)?;
        let whole = t.elapsed().as_secs_f64();
        args.extend(["--force", stage]);
        let t = Instant::now();
        camflow(&dir, &args)?;
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
    row["run_speedup"] = ratio(&row, "run_s_fuse_1", &format!("run_s_fuse_{max}"));
    row[format!("{stage}_speedup")] = ratio(&row, &format!("{stage}_s_fuse_1"), &format!("{stage}_s_fuse_{max}"));
    row["locks_identical"] = json!(row["lock_sha256_fuse_1"] == row[format!("lock_sha256_fuse_{max}")]);
    print_out(&format!("{row}\n"));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_are_three_counts_in_range() {
        assert_eq!(parse_shape("2, 9,4"), Ok((2, 9, 4)));
        for bad in ["1,x,1", "1,1", "0,1,1", "1,0,1", "1,1,5", "1,1,0", "1,1,1,1"] {
            assert!(parse_shape(bad).is_err(), "{bad}");
        }
    }

    fn expanded(yaml: &str) -> Vec<crate::sweep::Instance> {
        let catalog = crate::stages::catalog();
        let p = crate::spec::parse(Path::new("sweep.yaml"), yaml, &[], &catalog).expect("the generated study is a valid spec");
        let order = crate::dag::stage_order(&p.stages);
        crate::sweep::expand_checked(&p, &order, &catalog, 1_000_000).expect("within the limit")
    }

    #[test]
    fn the_generated_study_has_the_instances_it_claims() {
        // The smallest study: one training.
        assert_eq!(scale_size(1), (1, 11));
        for n in [11, 12, 21, 1_000, 10_000] {
            let (trainings, instances) = scale_size(n);
            assert!(instances >= n && instances < n + 10, "{n}: {instances}");
            let got = expanded(&scale_yaml(trainings));
            assert_eq!(got.len(), instances, "{n}");
            let per_stage = |s: &str| got.iter().filter(|i| i.stage == s).count();
            assert_eq!(
                (per_stage("data"), per_stage("train"), per_stage("cams"), per_stage("masks")),
                (1, trainings, trainings, 8 * trainings)
            );
        }
        assert_eq!(scale_size(100_000), (10_000, 100_001));
    }

    #[test]
    fn the_paper_shaped_sweep_has_the_stages_it_claims() {
        let got = expanded(&sweep_yaml(3, 5, 4));
        assert_eq!(got.len(), 3 * (2 + 2 * 5 + 3 * 4) + 1);
    }

    #[test]
    fn targets_are_judged_only_where_measured() {
        let t = |ms, peak_mb| Some(Timed { ms, cpu_ms: None, peak_mb });
        assert_eq!(target_lines(9_999, t(5.0, Some(1.0)), t(5.0, None)), "");
        let s = target_lines(10_001, None, t(99.0, None));
        assert!(s.starts_with("PASS no-op rerun of 10001 instances: 99.0 ms"), "{s}");
        assert!(target_lines(10_001, None, t(100.0, None)).starts_with("MISS"));
        let s = target_lines(100_001, t(900.0, Some(499.0)), None);
        assert!(s.starts_with("PASS plan of 100001 instances: 900 ms, 499 MB"), "{s}");
        assert!(target_lines(100_001, t(900.0, Some(501.0)), None).starts_with("MISS"));
        assert!(target_lines(100_001, t(1_001.0, Some(100.0)), None).starts_with("MISS"));
        // Memory that could not be measured is not a pass.
        assert!(target_lines(100_001, t(900.0, None), None).starts_with("MISS"));
    }
}
