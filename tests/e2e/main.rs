//! End-to-end tests: the real `camflow` binary on real files, with the real stage kinds at
//! tiny sizes (16x16 phantoms, one epoch).

mod cache_safety;
mod caching;
mod concurrency;
mod conveniences;
mod cpu_profile;
mod data_rules;
mod fusion;
mod fuzz_specs;
mod gpu_share;
mod guards;
mod kill_loop;
mod leases;
mod locked;
mod pipelines;
mod readme_examples;
mod reference;
mod report;
mod repro;
mod scale;
mod science;
mod seeds;
mod slurm;
mod slurm_smoke;
mod spec_errors;
mod support;
#[cfg(feature = "wgpu")]
mod wgpu;
