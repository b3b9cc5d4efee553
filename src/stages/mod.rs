//! The stage kinds of the method, each behind [`crate::stage_kind::StageKind`]: the bridge
//! between the orchestration core and the ML code. Maps resolved params onto ml configs and
//! artifact files onto ml types; holds no ML logic of its own.

mod data;
mod filter;
mod gradcam;
mod io;
mod params;
mod score;
mod threshold;
mod train;

use crate::stage_kind::Catalog;

/// Every kind this binary knows.
pub fn catalog() -> Catalog {
    Catalog {
        kinds: vec![
            Box::new(data::Data),
            Box::new(train::Train { retrain: false }),
            Box::new(gradcam::GradCam),
            Box::new(threshold::Threshold),
            Box::new(filter::Filter),
            Box::new(train::Train { retrain: true }),
            Box::new(score::Score),
        ],
    }
}
