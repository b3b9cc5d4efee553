//! Machine learning: data, models, training, Grad-CAM, masks, filters and scores.
//!
//! Knows nothing of YAML, the cache or tokio; `stages` is the only bridge to it.

pub mod backend;
pub mod cpu_kernels;
pub mod dataset;
pub mod fast_ops;
pub mod filter;
pub mod fused;
pub mod gpu_kernel_cache;
pub mod gradcam;
pub mod loaders;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod planes;
pub mod resize;
pub mod rng;
pub mod stacked;
pub mod stacked_ops;
pub mod synthetic;
pub mod threshold;
pub mod train;
pub mod weights;
