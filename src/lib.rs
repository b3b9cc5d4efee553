//! camflow: a declarative, content-addressed workflow orchestrator for Grad-CAM
//! segmentation studies. See ARCHITECTURE.md for the map.

pub mod cache;
pub mod cli;
pub mod dag;
pub mod error;
pub mod exec;
pub mod host;
pub mod lockfile;
pub mod malloc_tuning;
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
