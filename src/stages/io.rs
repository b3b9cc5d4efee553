//! Reading and writing the artifact files that stage kinds exchange.

use std::path::Path;

use crate::ml::dataset::Dataset;
use crate::ml::planes::Planes;
use crate::stage_kind::{InputArtifact, StageError};

pub const DATASET_FILE: &str = "dataset.bin";
pub const HEATMAPS_FILE: &str = "heatmaps.bin";
pub const MASKS_FILE: &str = "masks.bin";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const CONFIG_FILE: &str = "config.json";

pub fn file<'a>(inputs: &'a std::collections::BTreeMap<String, InputArtifact>, slot: &str, name: &str) -> Result<&'a Path, StageError> {
    inputs
        .get(slot)
        .and_then(|a| a.files.get(name))
        .map(|p| p.as_path())
        .ok_or_else(|| StageError::new(format!("input `{slot}` has no file `{name}`")))
}

pub fn read(path: &Path) -> Result<Vec<u8>, StageError> {
    std::fs::read(path).map_err(|e| StageError::new(format!("{}: {e}", path.display())))
}

pub fn write(dir: &Path, name: &str, bytes: &[u8]) -> Result<String, StageError> {
    let p = dir.join(name);
    std::fs::write(&p, bytes).map_err(|e| StageError::new(format!("{}: {e}", p.display())))?;
    Ok(name.to_string())
}

pub fn dataset(path: &Path) -> Result<Dataset, StageError> {
    Dataset::decode(&read(path)?).map_err(|e| StageError::new(format!("{}: {e}", path.display())))
}

pub fn planes(path: &Path) -> Result<Planes, StageError> {
    Planes::decode(&read(path)?).map_err(|e| StageError::new(format!("{}: {e}", path.display())))
}
