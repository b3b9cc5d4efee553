//! Spec errors: each names the file, the field path and, where known, the line and column.
//! All errors of a file are collected in one pass and reported together.

use std::fmt;
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq)]
pub struct SpecError {
    /// Field path such as `stages.masks.inputs.heatmaps` (empty for the whole file).
    pub field: String,
    pub location: Option<(usize, usize)>,
    pub message: String,
}

#[derive(Debug, Clone)]
pub struct SpecErrors {
    pub file: PathBuf,
    pub errors: Vec<SpecError>,
}

pub type SpecResult<T> = Result<T, SpecErrors>;

impl fmt::Display for SpecErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "error: {}", self.file.display())?;
            if let Some((l, c)) = e.location {
                write!(f, ":{l}:{c}")?;
            }
            if e.field.is_empty() {
                write!(f, ": {}", e.message)?;
            } else {
                write!(f, ": {}: {}", e.field, e.message)?;
            }
        }
        if self.errors.len() > 1 {
            write!(f, "\n{} errors in {}", self.errors.len(), self.file.display())?;
        }
        Ok(())
    }
}

impl std::error::Error for SpecErrors {}
