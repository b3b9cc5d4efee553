//! camflow: a declarative, content-addressed workflow orchestrator for Grad-CAM
//! segmentation studies. See ARCHITECTURE.md for the map.

// `gpu-tuned` chooses the kernels of a GPU backend; alone it would build a CPU-only camflow
// that looks like a GPU build to whoever asked for it.
#[cfg(all(feature = "gpu-tuned", not(any(feature = "cuda", feature = "wgpu"))))]
compile_error!("the `gpu-tuned` feature needs a GPU backend: build with `--features cuda,gpu-tuned` or `--features wgpu,gpu-tuned`");

pub mod cache;
pub mod cli;
pub mod dag;
pub mod error;
pub mod exec;
pub mod host;
pub mod lockfile;
pub mod malloc_tuning;
pub mod panics;
pub mod ml;
pub mod plan;
pub mod report;
pub mod results;
pub mod spec;
pub mod stage_kind;
pub mod stages;
pub mod stats;
pub mod suggest;
pub mod sweep;
